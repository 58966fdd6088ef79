"""What a run says on the console, outside the metrics log: one-line notices, once, by rank 0."""

from __future__ import annotations

import os
import sys

_said: set[str] = set()


def say_once(text: str) -> None:
    """`ds-vlm: text` on rank 0's stderr, once per process."""
    if text in _said:
        return
    _said.add(text)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"ds-vlm: {text}", file=sys.stderr, flush=True)
