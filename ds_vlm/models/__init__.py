"""One adapter per model family; `adapter_for` picks it from the model config's `model_type`. An image-text-to-text
type with no adapter of its own takes the generic one (`generic.py`), which refuses by name what it cannot do."""

from __future__ import annotations

from ds_vlm.models.base import Adapter, ModelParts, UnsupportedModel
from ds_vlm.models.gemma3 import Gemma3Adapter
from ds_vlm.models.gemma4 import Gemma4Adapter
from ds_vlm.models.generic import GenericAdapter, image_text_to_text_types
from ds_vlm.models.glm46v import Glm46VAdapter
from ds_vlm.models.llava import LlavaAdapter
from ds_vlm.models.llava_onevision import LlavaOnevisionAdapter
from ds_vlm.models.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from ds_vlm.models.qwen3_5 import Qwen35Adapter, Qwen35MoeAdapter
from ds_vlm.models.qwen3_vl import Qwen3VLAdapter
from ds_vlm.models.qwen3_vl_moe import Qwen3VLMoeAdapter
from ds_vlm.models.smolvlm import SmolVLMAdapter

ADAPTERS: tuple[Adapter, ...] = (Qwen3VLAdapter(), Qwen3VLMoeAdapter(), Qwen25VLAdapter(), Qwen2VLAdapter(),
                                 LlavaAdapter(), Qwen35Adapter(), Qwen35MoeAdapter(), Gemma3Adapter(),
                                 SmolVLMAdapter(), SmolVLMAdapter("idefics3"), Glm46VAdapter(), Gemma4Adapter(),
                                 LlavaOnevisionAdapter())
# Image-text-to-text types trained through the generic adapter and verified by the family suite (a tiny offline model
# in ds_vlm/testing/tiny.py, the same tests as the families with adapters of their own).
GENERIC_VERIFIED = ("mistral3", "internvl")
FAMILIES = tuple(a.family for a in ADAPTERS) + GENERIC_VERIFIED


def adapter_for(model_type: str) -> Adapter:
    """The family's adapter; the generic adapter for another image-text-to-text type; else UnsupportedModel."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    if model_type in image_text_to_text_types():
        return GenericAdapter(model_type)
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedModel(f"model type {model_type!r} is not supported: it has no adapter and transformers does not "
                           f"map it to AutoModelForImageTextToText; supported families: {supported}; through the "
                           f"generic adapter, verified: {', '.join(GENERIC_VERIFIED)}")


def model_config(path: str, trust_remote_code: bool = False):
    """The checkpoint's transformers config; a type this transformers does not know is UnsupportedModel, in one
    line (transformers says it in five)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "does not recognize this architecture" not in str(err):
            raise
        import json
        from pathlib import Path

        config = Path(path) / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        import transformers

        raise UnsupportedModel(f"{path}: model type {model_type!r} is unknown to the installed transformers "
                               f"{transformers.__version__} (a newer one, or --trust_remote_code, may know it)"
                               ) from err


def adapter_by_family(family: str) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    if family in GENERIC_VERIFIED:
        return GenericAdapter(family)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


__all__ = ["Adapter", "ModelParts", "UnsupportedModel", "adapter_for", "adapter_by_family", "ADAPTERS", "FAMILIES",
           "GenericAdapter", "model_config", "GENERIC_VERIFIED"]
