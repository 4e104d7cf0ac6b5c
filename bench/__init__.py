"""Benchmarks (not tests): speed and quality tables written to bench/results/."""
