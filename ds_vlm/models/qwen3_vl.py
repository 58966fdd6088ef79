"""Qwen3-VL: model.model.visual (blocks + merger + deepstack mergers), model.model.language_model."""

from __future__ import annotations

from .base import ModelParts, TinyModel
from .qwen import QwenVLAdapter, qwen_processor, qwen_token_ids
from .tiny import IMAGE_SIZE, MROPE, text_config

TINY_PATCH = 8  # the demo model: 64x64 images -> 8 x 8 patches -> 16 image tokens


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

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

    def tiny(self, tokenizer, token_ids: dict, **text_extra) -> TinyModel:
        """The demo model: patch 8, merge 2, vision 2 blocks x 64, deepstack at block 0."""
        import transformers as tf

        pixels = IMAGE_SIZE * IMAGE_SIZE
        processor = qwen_processor(tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor, tokenizer, TINY_PATCH, 2,
                                   pixels // 4, pixels)
        config = self.config_class()(
            text_config=text_config(tokenizer, token_ids, {"mrope_section": MROPE, "mrope_interleaved": True},
                                    **text_extra),
            vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=TINY_PATCH,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                               num_position_embeddings=(IMAGE_SIZE // TINY_PATCH) ** 2, deepstack_visual_indexes=[0]),
            **qwen_token_ids(token_ids), tie_word_embeddings=True,
        )
        return TinyModel(config, self.model_class(), processor)

    def config_class(self):
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig

    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration


# --------------------------------------------------------------------------- real-size architecture

# Qwen/Qwen3-VL-2B-Instruct's config.json (text tower = Qwen3-1.7B's shape). Only the special-token ids
# differ: they are the demo tokenizer's.
QWEN3_VL_2B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
    attention_bias=False, attention_dropout=0.0, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
QWEN3_VL_2B_VISION = dict(
    depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, in_channels=3, patch_size=16,
    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh",
)
# Qwen3-VL's image processor: patch 16, merge 2 (32 px per image token), mean/std 0.5; the pixel bounds
# are the released shortest edge (65536 = 64 tokens) and a 1024-token ceiling for the benchmark.
QWEN3_VL_2B_PIXELS = (65536, 1024 * 32 * 32)


def qwen3_vl_2b_config(token_ids: dict):
    """The Qwen3-VL-2B-Instruct architecture; `token_ids` maps Qwen's special tokens to the tokenizer's ids."""
    from transformers import Qwen3VLConfig

    pad = token_ids["<|endoftext|>"]
    return Qwen3VLConfig(
        text_config=dict(QWEN3_VL_2B_TEXT, pad_token_id=pad, bos_token_id=pad, eos_token_id=token_ids["<|im_end|>"]),
        vision_config=dict(QWEN3_VL_2B_VISION), **qwen_token_ids(token_ids), tie_word_embeddings=True,
    )


def qwen3_vl_2b_processor(tokenizer):
    """Qwen3-VL's processor settings around `tokenizer` (any tokenizer with Qwen's special tokens)."""
    import transformers as tf

    min_pixels, max_pixels = QWEN3_VL_2B_PIXELS
    return qwen_processor(tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor, tokenizer, 16, 2, min_pixels, max_pixels,
                          image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
