"""Every runtime change ds-vlm makes to torch, transformers or DeepSpeed, in one place.

Each change is a named `Patch` (what it changes, why, the library versions it was written for, and when it is
installed and removed), declared in the module of its library or concern:

    environment.py                 the environment variables and logger levels set at `import ds_vlm`
    deepspeed_autoep.py            the router logits of AutoEP's MoE layers recorded for transformers' aux loss
    deepspeed_startup.py           DeepSpeed's Muon import without torch.compile; py-cpuinfo asked once
    deepspeed_ulysses.py           DeepSpeed's Ulysses wrapper for any batch size, on a slice only
    torch_lm_head.py               the LM head's call computes the label-row loss during a training forward
    torch_modules.py               Qwen's patch embedding run as a linear layer; the token embeddings' output
                                   requiring grad under activation checkpointing
    transformers_attention.py      our attention and mask functions registered; the language model's forward
                                   given extra kwargs while armed; a vision tower routed to the varlen kernel
    transformers_linear_attention.py  Gated DeltaNet layers made sample-aware (subclass swap)
    transformers_loading.py        ZeRO-3's HfDeepSpeedConfig set aside; fused-expert loading under ZeRO-3
    transformers_trace.py          the planner's fake-tensor trace: transformers' tracing checks
    torch_serialization.py         checkpoints read with weights_only=True

Nothing outside this package assigns a foreign object's `forward` or `__class__`, uses `mock.patch`, or
registers a forward hook that changes what a model computes (tests/unit/test_patches.py checks the source;
the planner's measuring hooks in memplan/live_bytes.py stay where they are: they observe, they change nothing).
`registered()` lists every patch (importing every module of this package first).
"""

from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

_REGISTRY: dict[str, "Patch"] = {}


@dataclass(frozen=True)
class Patch:
    name: str       # unique, e.g. "lm_head_label_loss"
    library: str    # "torch", "transformers", "deepspeed" (or several, comma-separated)
    versions: str   # what it was written for and tested with, e.g. "transformers 5.24.0"
    target: str     # what it changes
    reason: str     # why
    scope: str      # installed by which setup step, removed when


def patch(name: str, *, library: str, versions: str, target: str, reason: str, scope: str) -> Patch:
    """Declare a patch (at the top of its module)."""
    if name in _REGISTRY:
        raise ValueError(f"patch {name!r} is declared twice")
    declared = Patch(name, library, versions, target, reason, scope)
    _REGISTRY[name] = declared
    return declared


def registered() -> list[Patch]:
    """Every patch ds-vlm can install, by name."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return sorted(_REGISTRY.values(), key=lambda p: p.name)


@contextmanager
def attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` inside the block, what it was after (this package's own helper)."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)
