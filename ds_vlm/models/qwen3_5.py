"""Qwen3.5 and Qwen3.5-MoE: the Qwen3-VL vision tower without deepstack (model.model.visual: patch_embed,
pos_embed, blocks, merger) and a hybrid language tower (model.model.language_model): most decoder layers are
Gated DeltaNet linear attention (`linear_attn`), every `full_attention_interval`-th one gated full attention
(`self_attn`), as `layer_types` in the text config says. Both layer kinds are transformers'
GradientCheckpointingLayer, so activation checkpointing of the language model wraps them all.

Packing and sequence parallelism need more than the attention layers get: a linear-attention layer carries a
causal conv window and a recurrent state along the row, and transformers' PyTorch path cannot restart them at a
packed sample's boundary (without boundaries sample 2 would see sample 1). ds_vlm/parallel/linear_attention.py
gives those layers the boundaries (FLA's varlen kernels on a GPU, the layer's own math sample by sample
elsewhere) and, under --sequence_parallel, whole sequences of 1/N of their heads (two all-to-alls of their own).
"""

from __future__ import annotations

from ds_vlm.models.moe import MoeExperts
from ds_vlm.models.qwen3_vl import Qwen3VLAdapter


class Qwen35Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)


class Qwen35MoeAdapter(MoeExperts, Qwen35Adapter):
    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
    # AutoEP's own qwen3_5_moe preset refuses the VLM's model_type (it asks for the qwen3_5_moe_text backbone's
    # config, and AutoEP reads the top-level one); qwen3_moe's preset is the same layout field by field (fused
    # gate_up_proj / down_proj, top-k softmax router, sigmoid-gated shared expert)
    autoep_preset = "qwen3_moe"
