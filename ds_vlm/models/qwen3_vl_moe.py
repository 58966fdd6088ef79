"""Qwen3-VL-MoE: the Qwen3-VL layout with sparse MoE blocks in the language tower.

Under ZeRO-3 nothing more is needed: transformers 5 stores each layer's experts as two fused 3-d
parameters that are gathered whole whenever the block runs, so an expert that receives no token on
one rank changes no collective (it just gets a zero gradient slice there). Loading such a checkpoint
partitioned needed a fix in `engine.load_model` (the experts' layout check read ZeRO-3's empty shape).
The router's auxiliary load-balancing loss is not added to the training loss (the loss comes from the
logits); the router trains through the routing weights.
"""

from __future__ import annotations

from .qwen3_vl import Qwen3VLAdapter


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
