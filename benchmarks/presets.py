"""The benchmark's model presets and data: the tiny demo model or Qwen3-VL-2B's architecture with random
weights, coloured-shape records (fixed or varied lengths), and every record's real token count."""

from __future__ import annotations

import json
import random
from pathlib import Path

PRESETS = {
    # The demo's tiny Qwen3-VL (0.4 M parameters, 64x64 images -> 16 image tokens) on the demo data.
    # 120 steps over 640 records (4 epochs): ~6 s of measured steps per case, so that a shared machine's
    # bursts of load average out (with 40 steps, rounds of the same case differed by up to 40%).
    "tiny": dict(image_side=64, micro_batch_size=8, steps=120, warmup=10, max_length=512, lr=1e-4, records=640),
    # Qwen3-VL-2B-Instruct's architecture, random weights; 448x448 images -> 196 image tokens.
    "qwen3-vl-2b": dict(image_side=448, micro_batch_size=4, steps=30, warmup=10, max_length=4096, lr=2e-5),
}

# --------------------------------------------------------------------------- Qwen3-VL-2B preset

def demo_tokenizer():
    """The demo's byte-level BPE (Qwen's special tokens and chat template), trained on the benchmark's words."""
    from ds_vlm.demo import CHAT_TEMPLATE, COLORS, SHAPES, build_tokenizer, caption

    words = [caption(c, s) for c in COLORS for s in SHAPES] + ["What is in this picture?"]
    words += [s.format(color=c, shape=h) for s in EXTRA_SENTENCES for c in COLORS for h in SHAPES]
    return build_tokenizer(words, (), CHAT_TEMPLATE)


def preset_config(preset: str):
    """(model config, tokenizer, processor) of a preset, nothing built (the tiny one: read from a built dir)."""
    from ds_vlm.demo import QWEN_SPECIAL_TOKENS

    if preset != "qwen3-vl-2b":
        raise ValueError(f"preset_config: only qwen3-vl-2b is built from a config here, not {preset!r}")
    tokenizer = demo_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    from ds_vlm.testing.real import qwen3_vl_2b_config, qwen3_vl_2b_processor

    return qwen3_vl_2b_config(ids), tokenizer, qwen3_vl_2b_processor(tokenizer)


def count_parameters(config) -> tuple[int, int]:
    """(all parameters, those ds_vlm trains by default: projector + language tower) on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import ModelConfig
    from ds_vlm.models import adapter_for
    from ds_vlm.models.loading import set_trainable

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    set_trainable(model, adapter_for(config.model_type), ModelConfig())
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def build_model(preset: str, out: Path, seed: int = 0) -> Path:
    """The preset's model folder (config, random weights, tokenizer, processor)."""
    from ds_vlm.demo import build_model_dir

    if preset == "tiny":
        return build_model_dir(out, seed=seed)
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    config, tokenizer, processor = preset_config(preset)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16: half the memory, half the file
    try:
        model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    return out


# --------------------------------------------------------------------------- data

EXTRA_SENTENCES = ("The {shape} is {color}.", "It is a {color} {shape} on a light background.",
                   "There is one {shape} in the picture.", "Its colour is {color}.")
IMAGE_SIDE_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
MEAN_EXTRA_SENTENCES = 4.0
MAX_EXTRA_SENTENCES = 40


def build_shapes_data(out: Path, n: int, seed: int, side: int, varied: bool) -> Path:
    """Coloured-shape captions as JSONL + PNGs (the demo's layout). varied=False: every image side x side,
    one-sentence answers. varied=True: image width and height each drawn from side x (0.5, 0.75, 1, 1.5, 2),
    answers of 1 + k sentences, k ~ exponential with mean 4 (capped at 40): a long tail, as SFT data has."""
    from ds_vlm.demo import COLORS, PROMPT, SHAPES, caption, draw_shape

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        image = draw_shape(color, shape, rng, side)
        answer = caption(color, shape)
        if varied:
            width, height = (max(16, round(side * rng.choice(IMAGE_SIDE_FACTORS))) for _ in range(2))
            image = image.resize((width, height))
            extra = min(MAX_EXTRA_SENTENCES, int(rng.expovariate(1 / MEAN_EXTRA_SENTENCES)))
            answer = " ".join([answer] + [rng.choice(EXTRA_SENTENCES).format(color=color, shape=shape)
                                          for _ in range(extra)])
        rel = f"images/{i:05d}.png"
        image.save(out / rel)
        records.append({"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": answer}],
                        "images": [rel]})
    path = out / "train.jsonl"
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def build_train_data(preset: str, out: Path, n: int, seed: int = 0) -> Path:
    if preset == "tiny":
        from ds_vlm.demo import build_data_dir

        build_data_dir(out, n_train=n, n_test=8, seed=seed)  # the demo data itself
        return out / "train.jsonl"
    return build_shapes_data(out, n, seed, PRESETS[preset]["image_side"], varied=False)



def token_lengths(model_dir: Path, data: Path, max_length: int) -> list[int]:
    """Every record's token count (image tokens included) from the real processor and encoder."""
    import numpy as np
    from transformers import AutoConfig, AutoProcessor

    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.preflight import check_columns
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for

    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = adapter_for(AutoConfig.from_pretrained(model_dir).model_type)
    records = RecordIndex(str(data))
    checks = check_columns(records, Encoder(processor, adapter, max_length), np.arange(len(records)))
    if checks.bad.any():
        raise RuntimeError(f"{int(checks.bad.sum())} record(s) of {data} do not encode: "
                           f"{next(iter(checks.messages.values()))}")
    return checks.n_tokens.tolist()
