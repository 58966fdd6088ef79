"""What the GPU check's orchestrator (gpu_check.py) and its stages (gpu_stages.py) share: the repository root,
the training flags of every stage's run, and the environment its processes run in. Both import this module,
neither imports the other at its top (gpu_check starts each stage as `--run_stage`, which imports gpu_stages)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: launch/train.py, ds_configs/
TRAIN_FLAGS = ["--max_steps", "4", "--save_steps", "2", "--micro_batch_size", "4", "--packing", "--lr", "1e-3",
               "--warmup_ratio", "0", "--max_length", "512", "--dist_timeout_s", "120", "--num_workers", "1"]


def stage_env() -> dict:
    """The environment of a stage's process and of the runs it starts: unbuffered output, one thread per rank
    unless the caller said otherwise."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
