"""Benchmarks: `python -m benchmarks.main` (main.py: training cases against the transformers Trainer and a plain
loop, padding, the loss's memory) and the GPU check (gpu_check.py)."""
