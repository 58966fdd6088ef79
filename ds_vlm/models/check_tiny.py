"""check-model's tiny instance: a model's config cut down (each tower to 2 blocks, narrowed; image geometry, token ids
and vocabulary kept), built with random weights beside the model's own processor, and a few records to train it on."""

from __future__ import annotations

import json
from pathlib import Path

TEXT_LIMITS = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4, num_local_experts=4)
VISION_LIMITS = dict(num_hidden_layers=2, depth=2, hidden_size=64, embed_dim=64, intermediate_size=128,
                     num_attention_heads=4, num_heads=4)


def shrink(config) -> list[str]:
    """Cut `config`'s towers down in place (never up); returns what changed, as key: old -> new."""
    changed = []

    def limit(sub, limits, where):
        for key, most in limits.items():
            try:
                value = getattr(sub, key, None)
            except Exception:  # noqa: BLE001 - a per-layer key read globally (Gemma 4's head_dim): left as it is
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                setattr(sub, key, most)
                changed.append(f"{where}.{key}: {value} -> {most}")

    text = config.get_text_config()
    layer_types = list(getattr(text, "layer_types", None) or [])
    limit(text, TEXT_LIMITS, "text")
    if layer_types and len(layer_types) > text.num_hidden_layers:  # keep one layer of each kind where there are two
        kinds = list(dict.fromkeys(layer_types))[:text.num_hidden_layers]
        text.layer_types = (kinds * text.num_hidden_layers)[:text.num_hidden_layers]
    rope = getattr(text, "rope_parameters", None) or {}
    try:
        head_dim = getattr(text, "head_dim", None) if "head_dim" in text.to_dict() else None
    except Exception:  # noqa: BLE001 - a per-layer key read globally (Gemma 4's head_dim): no mrope to fit
        head_dim = None
    if head_dim and "mrope_section" in rope:
        # the sections split the rotated half of a head: head_dim x partial_rotary_factor / 2 (GLM-4.6V: 0.5)
        half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        if sum(rope["mrope_section"]) != half:
            first = half // 2
            rope["mrope_section"] = ([first, (half - first) // 2, half - first - (half - first) // 2]
                                     if len(rope["mrope_section"]) == 3 else [half])
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        limit(vision, VISION_LIMITS, "vision")
        if hasattr(vision, "out_hidden_size"):
            vision.out_hidden_size = text.hidden_size
        indexes = getattr(vision, "deepstack_visual_indexes", None)
        if indexes:
            depth = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", 1)
            vision.deepstack_visual_indexes = [i for i in indexes if i < depth][:1] or [0]
    return changed


def build_tiny(model: str, out: Path, trust_remote_code: bool = False) -> str:
    """M's architecture shrunk, random weights, with M's processor (tokenizer, template) and generation config."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    from ds_vlm.models import model_config

    config = model_config(model, trust_remote_code)
    changed = shrink(config)
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    torch.manual_seed(0)
    tiny = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    try:
        tiny.generation_config = GenerationConfig.from_pretrained(model)
    except OSError:
        pass
    tiny.save_pretrained(out)
    processor.save_pretrained(out)
    millions = sum(p.numel() for p in tiny.parameters()) / 1e6
    return f"{millions:.2f} M parameters; " + ("; ".join(changed) if changed else "already tiny")


def write_data(out: Path) -> Path:
    """8 shape-captioning records, every other one text-only (mixed batches on 2 ranks)."""
    from ds_vlm.demo import build_data_dir

    build_data_dir(out, n_train=8, n_test=2)
    with open(out / "train.jsonl") as f, open(out / "mixed.jsonl", "w") as g:
        for i, line in enumerate(f):
            record = json.loads(line)
            if i % 2:
                answer = record["conversations"][1]["value"]
                record = {"conversations": [{"from": "human", "value": "Say the caption."},
                                            {"from": "gpt", "value": answer}], "images": []}
            g.write(json.dumps(record) + "\n")
    return out / "mixed.jsonl"
