"""What the MoE families (Qwen3-VL-MoE, Qwen3.5-MoE) share: fused experts, their loading under ZeRO-3, and the
router's auxiliary load-balancing loss.

Under ZeRO-3 nothing more is needed at training time: transformers 5 stores each layer's experts as two
fused 3-d parameters that are gathered whole whenever the block runs, so an expert that receives no token
on one rank changes no collective (it just gets a zero gradient slice there). Loading such a checkpoint
partitioned needs `loading()`.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace


class MoeExperts:
    """Mixed into a family's adapter before its dense base class."""

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

    def router_aux_loss_coef(self, config) -> float:
        """The weight of the router's load-balancing loss when the config asks for it (`output_router_logits`
        and `router_aux_loss_coef` in its text config): the model's output then carries `aux_loss`, and the
        training loss adds coef x aux_loss per micro-batch, as transformers' own loss does."""
        text = config.get_text_config()
        if not getattr(text, "output_router_logits", False):
            return 0.0
        return float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)

    def sequence_parallel_refusal(self, config) -> str:
        """The router's aux loss under --sequence_parallel: transformers 5.24 computes it inside the forward from
        the whole sequence's attention mask and one rank's slice of the router logits (a shape error), so a config
        that asks for it is refused until the loss is computed per slice."""
        if self.router_aux_loss_coef(config):
            return (f"--sequence_parallel with the router's auxiliary loss ({self.family}: output_router_logits and "
                    "router_aux_loss_coef in the config) is not supported yet: transformers computes it from the whole "
                    "sequence's mask and one rank's router logits; set output_router_logits to false, or train "
                    "with --sequence_parallel 1")
        return super().sequence_parallel_refusal(config)

    def generation_kwargs(self) -> dict:
        """No router logits while generating. transformers 5.24's Qwen3-VL-MoE and Qwen3.5-MoE compute the aux
        loss whenever `output_router_logits` is set, with the whole attention mask against the router logits of
        the new tokens only: every cached decoding step of a config that asks for the aux loss fails ("The size
        of tensor a (2) must match the size of tensor b (82)")."""
        return {"output_router_logits": False}


class _FullShapes:
    """A model seen only through `get_parameter(name).shape`, with ZeRO-3's full shapes."""

    def __init__(self, model):
        self._model = model

    def get_parameter(self, name: str):
        param = self._model.get_parameter(name)
        return SimpleNamespace(shape=getattr(param, "ds_shape", param.shape))
