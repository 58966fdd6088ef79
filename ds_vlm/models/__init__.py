"""One adapter per model family; `adapter_for` picks it from the model config."""

from __future__ import annotations

from .base import Adapter, ModelParts
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[Adapter, ...] = (Qwen3VLAdapter(),)


def adapter_for(model_type: str) -> Adapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise ValueError(f"model type {model_type!r} is not supported; supported families: {supported}")


__all__ = ["Adapter", "ModelParts", "adapter_for", "ADAPTERS"]
