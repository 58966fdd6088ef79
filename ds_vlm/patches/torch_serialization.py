"""Reading DeepSpeed's checkpoint files safely (checkpoint/export.py)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from ds_vlm.patches import patch

WEIGHTS_ONLY = patch(
    "checkpoints_weights_only", library="torch, deepspeed", versions="torch 2.14.1, deepspeed 0.19.8",
    target="torch.load forced to weights_only=True (torch's own TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, "
           "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD unset), with DeepSpeed's few checkpoint types allow-listed "
           "(torch.serialization.safe_globals)",
    reason="DeepSpeed's checkpoint readers (zero_to_fp32) call torch.load with weights_only=False: a checkpoint "
           "file could run code. With this, nothing in one can",
    scope="the export's consolidation of a checkpoint; the environment and the allow-list are restored after")

_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loading() -> Iterator[None]:
    """WEIGHTS_ONLY for the block."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
