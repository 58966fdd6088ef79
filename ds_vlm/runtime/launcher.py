"""Starting a DeepSpeed run from Python (`ds-vlm check-model`, the benchmarks, the GPU check): the launcher's
command line, and the shared-memory files a CPU run leaves behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def launcher(num_ranks: int, port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
            "--master_port", str(port)]


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce leaves one ~70 MB /dev/shm file per rank, named by the
    master address and port, after every run; remove those of our own run (they hold RAM, and a later run
    on the same port would open a stale one)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and hasattr(os, "getuid"):
        for path in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            try:
                path.unlink()
            except OSError:
                pass
