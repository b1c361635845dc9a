"""Benchmarks and the driver that runs one vLLM instance in its own process."""
