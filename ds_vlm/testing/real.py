"""Real-size architectures from their published configs, with random weights and the demo tokenizer (no
download): what the benchmarks, the GPU check and the planner measure at scale."""

from __future__ import annotations

from .tiny import qwen_processor, qwen_token_ids

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
