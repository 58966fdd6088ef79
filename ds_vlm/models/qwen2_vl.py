"""Qwen2-VL and Qwen2.5-VL: model.model.visual (patch_embed, blocks, merger), model.model.language_model."""

from __future__ import annotations

from .base import ModelParts
from .qwen import QwenVLAdapter


class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)

    def parts(self, model) -> ModelParts:
        visual = model.model.visual
        return ModelParts(
            vision=[visual.patch_embed, visual.blocks],  # rotary_pos_emb holds buffers only
            vision_blocks=visual.blocks,
            projector=[visual.merger],
            llm=[model.model.language_model, model.lm_head],
            llm_decoder=model.model.language_model,
            vision_encoder=visual,
        )

    def vision_depth_width(self, config) -> tuple[int, int]:
        return config.vision_config.depth, config.vision_config.embed_dim  # hidden_size is the merger's output



class Qwen25VLAdapter(Qwen2VLAdapter):
    """Same layout as Qwen2-VL (window attention and an RMSNorm/SwiGLU vision tower inside the blocks)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def vision_depth_width(self, config) -> tuple[int, int]:
        return config.vision_config.depth, config.vision_config.hidden_size

