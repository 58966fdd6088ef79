#!/usr/bin/env python
"""Training throughput, memory and padding, measured in one run on one model and one data set.

    python launch/bench.py [--preset tiny|qwen3-vl-2b] [--workdir DIR] [--out bench.json]
                           [--steps N --warmup N --micro_batch_size 8 --num_ranks 2 --repeats 2]
                           [--loss_memory_tokens 16384]
                           [--cases ds_zero0,ds_zero2,ds_zero3,plain,hf_zero0,hf_zero2,hf_zero3] [--dry_run]

The benchmark itself is in benchmarks/ (benchmarks/main.py: the cases, the flags, the targets; `--help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside ds_vlm/, not installed

from benchmarks.main import main

if __name__ == "__main__":
    sys.exit(main())
