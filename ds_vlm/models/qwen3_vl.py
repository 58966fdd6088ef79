"""Qwen3-VL: model.model.visual (blocks + merger + deepstack mergers), model.model.language_model."""

from __future__ import annotations

from .base import Adapter, ModelParts


class Qwen3VLAdapter(Adapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"

    def parts(self, model) -> ModelParts:
        visual = model.model.visual
        projector = [visual.merger, visual.deepstack_merger_list]
        return ModelParts(
            vision=[visual.patch_embed, visual.pos_embed, visual.blocks],
            vision_blocks=visual.blocks,
            projector=projector,
            llm=[model.model.language_model, model.lm_head],
            llm_decoder=model.model.language_model,
            vision_encoder=visual,
        )
