"""Qwen3.5 and Qwen3.5-MoE: the Qwen3-VL vision tower without deepstack (model.model.visual: patch_embed,
pos_embed, blocks, merger) and a hybrid language tower (model.model.language_model): most decoder layers are
Gated DeltaNet linear attention (`linear_attn`), every `full_attention_interval`-th one gated full attention
(`self_attn`), as `layer_types` in the text config says. Both layer kinds are transformers'
GradientCheckpointingLayer, so activation checkpointing of the language model wraps them all.

Packing is refused for now: the linear-attention layers carry a causal conv window and a recurrent state
along the row, and transformers' PyTorch path of Gated DeltaNet cannot restart them at a packed sample's
boundary (given boundaries without the FLA kernels it raises; without boundaries sample 2 would see sample 1).
So is sequence parallelism: Ulysses re-splits heads for attention only, and a linear-attention layer would run
on its rank's slice of the sequence alone.
"""

from __future__ import annotations

from typing import Optional

from .moe import MoeExperts
from .qwen3_vl import Qwen3VLAdapter


class Qwen35Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)
    # full module-name prefixes, as transformers' quantizer matches them (from the start of a name)
    keep_full_precision = ("model.visual", "lm_head")

    def packing_refusal(self) -> Optional[str]:
        return (f"--packing is not supported for {self.family} yet: its Gated DeltaNet (linear-attention) layers "
                "would carry their conv window and recurrent state across packed samples; train padded (drop "
                "--packing)")

    def sequence_parallel_refusal(self) -> Optional[str]:
        return (f"--sequence_parallel is not supported for {self.family} yet: Ulysses splits the sequence "
                "between ranks, and its Gated DeltaNet (linear-attention) layers would each see their rank's "
                "slice only; train with --sequence_parallel 1")


class Qwen35MoeAdapter(MoeExperts, Qwen35Adapter):
    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
