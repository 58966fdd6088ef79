"""What a run reports: metrics.jsonl (one line per optimizer step) and a progress bar on rank 0."""

from __future__ import annotations

import json
import os
import sys
import time


class RunLog:
    """Rank 0 writes; other ranks hold a RunLog that does nothing."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def event(self, record: dict) -> None:
        """A non-step line (eval, save, skipped records) in the same file."""
        if self.enabled:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def info(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
