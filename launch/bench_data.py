#!/usr/bin/env python
"""Data benchmarks.

    python launch/bench_data.py --records 1000000 --out runs/bench_data.json     # data at scale
    python launch/bench_data.py --loader --model M --data D.jsonl [--out F.json]  # does loading keep up?

The first (benchmarks/data_scale.py) times launch to the first optimizer step on a generated million
records, cold and warm, with peak RSS per rank; the second (benchmarks/loader.py) measures records/s
per DataLoader worker count against the model's step time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside ds_vlm/, not installed

if __name__ == "__main__":
    if "--loader" in sys.argv[1:]:
        from benchmarks.loader import main
    else:
        from benchmarks.data_scale import main
    sys.exit(main(sys.argv[1:]))
