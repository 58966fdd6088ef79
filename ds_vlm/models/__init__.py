"""One adapter per model family; `adapter_for` picks it from the model config's `model_type`."""

from __future__ import annotations

from .base import Adapter, ModelParts
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from .qwen3_5 import Qwen35Adapter, Qwen35MoeAdapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen3_vl_moe import Qwen3VLMoeAdapter

ADAPTERS: tuple[Adapter, ...] = (Qwen3VLAdapter(), Qwen3VLMoeAdapter(), Qwen25VLAdapter(), Qwen2VLAdapter(),
                                 LlavaAdapter(), Qwen35Adapter(), Qwen35MoeAdapter())
FAMILIES = tuple(a.family for a in ADAPTERS)


def adapter_for(model_type: str) -> Adapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise ValueError(f"model type {model_type!r} is not supported; supported families: {supported}")


def adapter_by_family(family: str) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


__all__ = ["Adapter", "ModelParts", "adapter_for", "adapter_by_family", "ADAPTERS", "FAMILIES"]
