"""A tiny Qwen3.5 language tower for the linear-attention tests (packing, sequence parallelism, FLOPs): Gated
DeltaNet, full attention, Gated DeltaNet, built from a config alone (no tokenizer, no checkpoint)."""

from __future__ import annotations


def tiny_hybrid_text_config(moe: bool = False, **overrides):
    """Hidden 64; full attention 4 heads of 16 (2 KV heads); Gated DeltaNet 2 key heads of 16 serving 4 value
    heads of 16, a conv of 4 taps; no cache. `moe`: Qwen3.5-MoE's tower, 4 experts of 32 (2 a token) and a shared
    one."""
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    moe_keys = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32) if moe else {}
    keys = dict(**moe_keys, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                layer_types=["linear_attention", "full_attention", "linear_attention"], num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, use_cache=False)
    return (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**{**keys, **overrides})
