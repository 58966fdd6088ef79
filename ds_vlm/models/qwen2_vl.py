"""Qwen2-VL and Qwen2.5-VL: model.model.visual (patch_embed, blocks, merger), model.model.language_model."""

from __future__ import annotations

from ds_vlm.models.base import ModelParts
from ds_vlm.models.qwen import QwenVLAdapter


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

    def vision_attention_pairs(self, batch, config) -> list[int]:
        """The blocks of `fullatt_block_indexes` attend over each frame whole; the others within windows of
        `window_size` pixels: squares of window_size // patch // merge merged patches a side, tiled from each
        frame's top-left corner, cut at its right and bottom edges (transformers' get_vision_window_index). A
        window of a x b merged patches holds a b m^2 patches; over a frame the sum of their squares factors into
        rows and columns."""
        vision = config.vision_config
        merge = vision.spatial_merge_size
        side = vision.window_size // merge // vision.patch_size

        def squares(merged: int) -> int:  # sum of the squared extents of the windows along one side
            return sum(min(side, merged - start) ** 2 for start in range(0, merged, side))

        windowed = 0
        for key in ("image_grid_thw", "video_grid_thw"):
            grid = batch.get(key)
            for t, h, w in ([] if grid is None else grid.tolist()):
                windowed += t * squares(h // merge) * squares(w // merge) * merge ** 4
        full = super().vision_attention_pairs(batch, config)
        return [pairs if i in vision.fullatt_block_indexes else windowed for i, pairs in enumerate(full)]

