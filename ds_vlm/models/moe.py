"""What the MoE families (Qwen3-VL-MoE, Qwen3.5-MoE) share: fused experts, their loading under ZeRO-3, and the
router's auxiliary load-balancing loss.

Under ZeRO-3 nothing more is needed at training time: transformers 5 stores each layer's experts as two
fused 3-d parameters that are gathered whole whenever the block runs, so an expert that receives no token
on one rank changes no collective (it just gets a zero gradient slice there). Loading such a checkpoint
partitioned needs `loading()`.
"""

from __future__ import annotations

from contextlib import contextmanager


class MoeExperts:
    """Mixed into a family's adapter before its dense base class."""

    @contextmanager
    def loading(self, zero3: bool):
        """Under ZeRO-3, let transformers' shape-checked weight conversions see full parameter shapes (the patch
        `fused_experts_transpose_full_shapes`, ds_vlm/patches/transformers_loading.py)."""
        from ds_vlm.patches.transformers_loading import full_shapes_in_transpose

        if not zero3:
            yield
            return
        with full_shapes_in_transpose():
            yield

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

