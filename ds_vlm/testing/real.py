"""Real-size architectures from their published configs, with random weights and the demo tokenizer (no
download): what the benchmarks, the GPU check and the planner measure at scale."""

from __future__ import annotations

from ds_vlm.testing.tiny import qwen_processor, qwen_token_ids

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


# Qwen/Qwen3.5-27B (dense) and Qwen/Qwen3.5-35B-A3B (MoE), text towers as released: 3 Gated DeltaNet layers
# (16 key heads, 48 / 32 value heads of 128) then one gated full-attention layer (head_dim 256, rope on a
# quarter of it), over 64 / 40 layers; vocabulary 248,320, untied head. Special-token ids are the tokenizer's.
QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10], "mrope_interleaved": True}
QWEN3_5_LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                      linear_num_key_heads=16, full_attention_interval=4)
QWEN3_5_27B_TEXT = dict(
    QWEN3_5_LINEAR, vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
    num_attention_heads=24, num_key_value_heads=4, head_dim=256, linear_num_value_heads=48, hidden_act="silu",
    max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=QWEN3_5_ROPE,
)
QWEN3_5_35B_A3B_TEXT = dict(
    QWEN3_5_LINEAR, vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
    num_key_value_heads=2, head_dim=256, linear_num_value_heads=32, num_experts=256, num_experts_per_tok=8,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, router_aux_loss_coef=0.001, hidden_act="silu",
    max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=QWEN3_5_ROPE,
)
# both vision towers: 27 blocks x 1152, patch 16, merge 2 (no deepstack); the merger's output is the text width
QWEN3_5_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      hidden_act="gelu_pytorch_tanh")
QWEN3_5_REAL = {"qwen3.5-27b": ("Qwen3_5Config", QWEN3_5_27B_TEXT),
                "qwen3.5-35b-a3b": ("Qwen3_5MoeConfig", QWEN3_5_35B_A3B_TEXT)}


def qwen3_5_config(name: str, token_ids: dict):
    """A released Qwen3.5 architecture (`name`: a key of QWEN3_5_REAL); `token_ids` maps Qwen's special tokens to
    the tokenizer's ids."""
    import transformers as tf

    config_class, text = QWEN3_5_REAL[name]
    pad = token_ids["<|endoftext|>"]
    return getattr(tf, config_class)(
        text_config=dict(text, pad_token_id=pad, eos_token_id=token_ids["<|im_end|>"]),
        vision_config=dict(QWEN3_5_VISION, out_hidden_size=text["hidden_size"]), **qwen_token_ids(token_ids),
        tie_word_embeddings=False,
    )


def write_config_dir(config, processor, out):
    """A model folder with the config and processor only (no weights): what `python -m ds_vlm.plan --model`
    needs to plan a run."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    return out
