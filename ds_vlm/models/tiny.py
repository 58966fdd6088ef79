"""Shapes every family's tiny model shares (the demo's, the tests', the benchmarks'): a 2-layer language
tower of width 64 and the demo's 64x64 images."""

from __future__ import annotations

IMAGE_SIZE = 64  # the demo's images; each family's tiny processor turns one into 16 image tokens

# The language tower of every tiny family; mrope sections (Qwen) must sum to head_dim / 2.
TEXT = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
MROPE = [4, 2, 2]


def text_config(tokenizer, token_ids: dict, rope: dict | None = None, **extra) -> dict:
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
    assert sum(rope_parameters.get("mrope_section", [TEXT["head_dim"] // 2])) == TEXT["head_dim"] // 2
    return dict(vocab_size=len(tokenizer), **TEXT, rope_parameters=rope_parameters,
                pad_token_id=token_ids["<|endoftext|>"], **extra)
