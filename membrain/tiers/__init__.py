"""Storage tiers below vLLM's device KV cache: host (pinned RAM in the worker) and remote."""
