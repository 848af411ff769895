"""Benchmarks: `python -m benchmarks [--quick] [--only logprob,grpo] [--out DIR]`."""
