"""vLLM integration: the KV connector, its configuration, keys, plugin and stats."""
