"""Qwen2-VL and Qwen2.5-VL: model.model.visual (patch_embed, blocks, merger), model.model.language_model."""

from __future__ import annotations

from .base import ModelParts, TinyModel
from .qwen import QwenVLAdapter, qwen_processor, qwen_token_ids
from .tiny import MROPE, text_config

TINY_PIXELS = 112 * 112  # patch 14, merge 2: 8 x 8 patches -> 16 image tokens


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

    def tiny(self, tokenizer, token_ids: dict) -> TinyModel:
        import transformers as tf

        processor = qwen_processor(tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor, tokenizer, 14, 2,
                                   TINY_PIXELS, TINY_PIXELS)
        config = tf.Qwen2VLConfig(
            text_config=text_config(tokenizer, token_ids, {"mrope_section": MROPE}, bos_token_id=None,
                                    eos_token_id=token_ids["<|im_end|>"]),
            vision_config=dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                               embed_dim=32, hidden_size=64, mlp_ratio=2),
            **qwen_token_ids(token_ids), tie_word_embeddings=True,
        )
        return TinyModel(config, tf.Qwen2VLForConditionalGeneration, processor)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Same layout as Qwen2-VL (window attention and an RMSNorm/SwiGLU vision tower inside the blocks)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def vision_depth_width(self, config) -> tuple[int, int]:
        return config.vision_config.depth, config.vision_config.hidden_size

    def tiny(self, tokenizer, token_ids: dict) -> TinyModel:
        import transformers as tf

        processor = qwen_processor(tf.Qwen2_5_VLProcessor, tf.Qwen2VLVideoProcessor, tokenizer, 14, 2,
                                   TINY_PIXELS, TINY_PIXELS)
        config = tf.Qwen2_5_VLConfig(
            text_config=text_config(tokenizer, token_ids, {"mrope_section": MROPE}, bos_token_id=None,
                                    eos_token_id=token_ids["<|im_end|>"]),
            # one window of 112 px (4 x 4 merged patches) and a full-attention last block
            vision_config=dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                               hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=112,
                               fullatt_block_indexes=[1]),
            **qwen_token_ids(token_ids), tie_word_embeddings=True,
        )
        return TinyModel(config, tf.Qwen2_5_VLForConditionalGeneration, processor)
