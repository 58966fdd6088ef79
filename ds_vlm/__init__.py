"""ds-vlm: DeepSpeed-native supervised fine-tuning of vision-language models."""

import hashlib
import os
import sys
from pathlib import Path


def _extensions_dir() -> str:
    """Where DeepSpeed JIT-builds its ops (TORCH_EXTENSIONS_DIR) unless the user chose: inside this environment
    (torch's default, ~/.cache/torch_extensions, is shared by every install on the machine: two venvs then
    rebuild each other's ops on every start and wait on each other's build locks). A read-only environment (a
    shared cluster install) gets a per-user folder named after it instead."""
    inside = Path(sys.prefix) / "torch_extensions"
    try:
        inside.mkdir(parents=True, exist_ok=True)
        if os.access(inside, os.W_OK | os.X_OK):
            return str(inside)
    except OSError:
        pass
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return str(Path.home() / ".cache" / "ds_vlm" / "torch_extensions" / f"{Path(sys.prefix).name}-{tag}")


os.environ.setdefault("TORCH_EXTENSIONS_DIR", _extensions_dir())
# A machine without an NVIDIA device: DeepSpeed is told it runs on the CPU rather than finding out, which it
# announces with a warning in every process at import (the launcher and each rank)
if not os.path.exists("/dev/nvidiactl") and not os.path.exists("/dev/dxg"):
    import logging

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # and torch's extension loader (DeepSpeed's op builders import it) would log "No CUDA runtime is found"
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
