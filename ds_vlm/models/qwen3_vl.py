"""Qwen3-VL: model.model.visual (blocks + merger + deepstack mergers), model.model.language_model. Qwen3.5's
vision tower is the same without the deepstack mergers (qwen3_5.py)."""

from __future__ import annotations

from ds_vlm.models.base import ModelParts
from ds_vlm.models.qwen import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def parts(self, model) -> ModelParts:
        visual = model.model.visual
        deepstack = getattr(visual, "deepstack_merger_list", None)  # Qwen3.5 has none
        projector = [visual.merger] + ([deepstack] if deepstack is not None else [])
        return ModelParts(
            vision=[visual.patch_embed, visual.pos_embed, visual.blocks],
            vision_blocks=visual.blocks,
            projector=projector,
            llm=[model.model.language_model, model.lm_head],
            llm_decoder=model.model.language_model,
            vision_encoder=visual,
        )

    def slice_per_token(self, language_kwargs: dict, start: int, end: int) -> dict:
        """The visual position mask, and the deepstack features of the visual tokens in [start, end) (they are
        rows in the order of the visual tokens over the whole batch)."""
        mask = language_kwargs.get("visual_pos_masks")
        if mask is None:
            return language_kwargs
        order = (mask.flatten().cumsum(0) - 1).view(mask.shape)  # each visual token's deepstack row
        local = mask[:, start:end]
        rows = order[:, start:end][local]
        deepstack = language_kwargs.get("deepstack_visual_embeds")
        return dict(language_kwargs, visual_pos_masks=local,
                    deepstack_visual_embeds=None if deepstack is None else [e[rows] for e in deepstack])
