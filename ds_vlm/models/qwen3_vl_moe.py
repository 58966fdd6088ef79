"""Qwen3-VL-MoE: the Qwen3-VL layout with sparse MoE blocks in the language tower.

Under ZeRO-3 nothing more is needed at training time: transformers 5 stores each layer's experts as two
fused 3-d parameters that are gathered whole whenever the block runs, so an expert that receives no token
on one rank changes no collective (it just gets a zero gradient slice there). Loading such a checkpoint
partitioned needs `loading()`. The router's auxiliary load-balancing loss is not added to the training
loss (the loss comes from the LM head); the router trains through the routing weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

from .qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    autoep_preset = "qwen3_moe"  # AutoEP has no Qwen3-VL-MoE preset; the text blocks share Qwen3-MoE's layout

    @contextmanager
    def loading(self, zero3: bool):
        """Under ZeRO-3, let transformers' shape-checked weight conversions see full parameter shapes.

        `Transpose(check_dims=True)` (the fused experts) transposes a checkpoint tensor unless its shape equals
        the model parameter's `.shape`; a ZeRO-3 parameter's `.shape` is its empty local partition, so a
        checkpoint already in the model's layout (any transformers 5 save, our own export included) was
        transposed and failed with a size mismatch. Compare with `ds_shape` instead.
        """
        try:
            from transformers.core_model_loading import Transpose
        except ImportError:  # another transformers layout: nothing to fix
            zero3 = False
        if not zero3:
            yield
            return
        original = Transpose.convert

        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            if kwargs.get("model") is not None:
                kwargs["model"] = _FullShapes(kwargs["model"])
            return original(self, input_dict, source_patterns, target_patterns, **kwargs)

        Transpose.convert = convert
        try:
            yield
        finally:
            Transpose.convert = original


class _FullShapes:
    """A model seen only through `get_parameter(name).shape`, with ZeRO-3's full shapes."""

    def __init__(self, model):
        self._model = model

    def get_parameter(self, name: str):
        param = self._model.get_parameter(name)
        return SimpleNamespace(shape=getattr(param, "ds_shape", param.shape))
