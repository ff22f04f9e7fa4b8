"""Benchmarks: speed and quality measurements that print ratios against a baseline measured in the same run."""
