"""Qwen3-VL-MoE: the Qwen3-VL layout with sparse MoE blocks in the language tower (moe.py: their loading under
ZeRO-3 and the router's auxiliary loss)."""

from __future__ import annotations

from ds_vlm.models.moe import MoeExperts
from ds_vlm.models.qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(MoeExperts, Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    autoep_preset = "qwen3_moe"  # AutoEP has no Qwen3-VL-MoE preset; the text blocks share Qwen3-MoE's layout
