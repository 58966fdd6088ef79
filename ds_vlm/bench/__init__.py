"""Benchmarks: each module one case, `python launch/bench.py` runs them and prints the report."""
