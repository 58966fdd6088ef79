"""Model building and loading: transformers' ZeRO-3 integration, and its fused-expert weight conversion."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator

from ds_vlm.patches import attribute, patch

ZERO3_INIT_SET_ASIDE = patch(
    "hf_deepspeed_config_set_aside", library="transformers", versions="transformers 5.24.0",
    target="transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref (private) set to None",
    reason="while a ZeRO-3 run's HfDeepSpeedConfig is alive, transformers builds every model under "
           "deepspeed.zero.Init, which partitions with collectives; the planner's shape-only copies on the meta "
           "device, the model checks' and the export's plain models must be built plainly (on one rank: the "
           "others would never join the collectives). transformers offers no public switch for it",
    scope="a context around each such from_config; the live config is restored at its end")

FULL_SHAPES_IN_TRANSPOSE = patch(
    "fused_experts_transpose_full_shapes", library="transformers, deepspeed",
    versions="transformers 5.24.0, deepspeed 0.19.8",
    target="transformers.core_model_loading.Transpose.convert: the model it is given answers `get_parameter"
           "(name).shape` with ZeRO-3's full shape (`ds_shape`)",
    reason="Transpose(check_dims=True) (MoE families' fused experts) transposes a checkpoint tensor unless its "
           "shape equals the model parameter's `.shape`; a ZeRO-3 parameter's `.shape` is its empty local "
           "partition, so a checkpoint already in the model's layout (any transformers 5 save, our own export "
           "included) was transposed and failed with a size mismatch",
    scope="Adapter.loading (MoeExperts) around from_pretrained under ZeRO-3; restored at its end")


@contextmanager
def zero3_init_set_aside() -> Iterator[None]:
    """ZERO3_INIT_SET_ASIDE for the block."""
    from transformers.integrations import deepspeed as hf_deepspeed

    with attribute(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None):
        yield


@contextmanager
def full_shapes_in_transpose() -> Iterator[None]:
    """FULL_SHAPES_IN_TRANSPOSE for the block (nothing where this transformers has no Transpose)."""
    try:
        from transformers.core_model_loading import Transpose
    except ImportError:  # another transformers layout: nothing to fix
        yield
        return
    original = Transpose.convert

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        if kwargs.get("model") is not None:
            kwargs["model"] = _FullShapes(kwargs["model"])
        return original(self, input_dict, source_patterns, target_patterns, **kwargs)

    with attribute(Transpose, "convert", convert):
        yield


class _FullShapes:
    """A model seen only through `get_parameter(name).shape`, with ZeRO-3's full shapes."""

    def __init__(self, model):
        self._model = model

    def get_parameter(self, name: str):
        param = self._model.get_parameter(name)
        return SimpleNamespace(shape=getattr(param, "ds_shape", param.shape))
