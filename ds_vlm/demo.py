"""The built-in offline demo: a tiny Qwen3-VL and a synthetic captioning set.

    python -m ds_vlm.demo --out DIR

writes DIR/model/ (config, random safetensors weights, tokenizer, chat template,
image and video processor) and DIR/data/ (train/test splits of coloured shapes in the
layout of the Pokemon captions data, as JSONL with image files and as parquet with
the images embedded). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
PROMPT = "<image>What is in this picture?"
IMAGE_SIZE = 64

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# A Qwen-style ChatML template. Images and videos render as Qwen's vision tokens; the
# trainer finds assistant spans by rendering prefixes, so no generation markers needed.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def caption(color: str, shape: str) -> str:
    return f"A {color} {shape}."


def draw_shape(color: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE):
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    extent = rng.randint(size * 3 // 8, size * 3 // 4)
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1)], fill=fill)
    return img


def build_tokenizer(extra_text: list[str]):
    """A byte-level BPE with Qwen's pre-tokenizer, trained on the demo's own words."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    corpus = list(extra_text) * 20 + [
        "user assistant system What is in this picture? The image shows",
        "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z . , ? !",
    ]
    probe = Qwen2Tokenizer()  # only for its pre-tokenizer and decoder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, extra_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model_dir(out: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen3-VL with tokenizer and processor to `out`."""
    import torch
    from transformers import (
        GenerationConfig, Qwen2VLImageProcessor, Qwen3VLConfig,
        Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor,
    )

    words = [caption(c, s) for c in COLORS for s in SHAPES] + [PROMPT.replace("<image>", "")]
    tokenizer = build_tokenizer(words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    patch, merge = 8, 2
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2, min_pixels=pixels // 4, max_pixels=pixels,
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2)
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    head_dim = 16
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True},
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=patch,
            spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=64,
            num_position_embeddings=(IMAGE_SIZE // patch) ** 2, deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_data_dir(out: Path, n_train: int = 2000, n_test: int = 100, seed: int = 0) -> Path:
    """Write train/test splits as JSONL (+ PNG files) and as parquet (embedded bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("test", n_test)):
        records, rows = [], []
        for i in range(count):
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            img = draw_shape(color, shape, rng)
            rel = f"images/{split}_{i:05d}.png"
            img.save(out / rel)
            conversations = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": caption(color, shape)}]
            records.append({"conversations": conversations, "images": [rel]})
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rows.append({"conversations": conversations, "images": [{"bytes": buf.getvalue(), "path": rel}]})
        with open(out / f"{split}.jsonl", "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        pq.write_table(pa.Table.from_pylist(rows), out / f"{split}.parquet")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write model/ and data/ into")
    parser.add_argument("--train_size", type=int, default=2000)
    parser.add_argument("--test_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    build_model_dir(out / "model", seed=args.seed)
    build_data_dir(out / "data", args.train_size, args.test_size, seed=args.seed)
    print(f"demo model: {out / 'model'}\ndemo data:  {out / 'data'} (train.jsonl, test.jsonl, *.parquet)")


if __name__ == "__main__":
    main()
