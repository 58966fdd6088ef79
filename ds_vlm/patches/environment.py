"""The environment variables and logger levels set at `import ds_vlm`.

They run at import, not from a setup step, on purpose: each must be in place before DeepSpeed is first
imported, and every way into ds-vlm (the CLI, `python -m ds_vlm.*`, the launch scripts, each rank, a
DataLoader worker, the tests and the benchmarks) imports the package before it imports DeepSpeed. Each is
a default: a value the user set wins.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

from ds_vlm.patches import patch

EXTENSIONS_DIR = patch(
    "torch_extensions_dir", library="torch, deepspeed", versions="torch 2.14.1, deepspeed 0.19.8",
    target="TORCH_EXTENSIONS_DIR (where DeepSpeed JIT-builds its ops), unless the user set it",
    reason="torch's default, ~/.cache/torch_extensions, is shared by every install on the machine: two "
           "environments then rebuild each other's ops on every start and wait on each other's build locks",
    scope="at `import ds_vlm` (before DeepSpeed's first import); never removed (a process setting)")

CPU_ACCELERATOR = patch(
    "cpu_accelerator", library="deepspeed, torch", versions="deepspeed 0.19.8, torch 2.14.1",
    target="DS_ACCELERATOR=cpu and the `torch.utils.cpp_extension` logger at ERROR, on a machine with no "
           "NVIDIA device",
    reason="DeepSpeed finding out on its own announces it with a warning in every process at import (the "
           "launcher and each rank), and torch's extension loader logs 'No CUDA runtime is found'",
    scope="at `import ds_vlm` (before DeepSpeed's first import); never removed (a process setting)")


def extensions_dir() -> str:
    """Where DeepSpeed JIT-builds its ops unless the user chose: inside this environment. A read-only
    environment (a shared cluster install) gets a per-user folder named after it instead."""
    inside = Path(sys.prefix) / "torch_extensions"
    try:
        inside.mkdir(parents=True, exist_ok=True)
        if os.access(inside, os.W_OK | os.X_OK):
            return str(inside)
    except OSError:
        pass
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return str(Path.home() / ".cache" / "ds_vlm" / "torch_extensions" / f"{Path(sys.prefix).name}-{tag}")


def apply_import_defaults() -> None:
    """EXTENSIONS_DIR and CPU_ACCELERATOR (called by ds_vlm/__init__.py)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    if not os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/dxg"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
