"""The built-in offline demo: a tiny Qwen3-VL (or another family) and a synthetic captioning set.

    python -m ds_vlm.demo --out DIR [--family qwen3_vl|qwen3_vl_moe|qwen2_5_vl|qwen2_vl|llava]

writes DIR/model/ (config, random safetensors weights, tokenizer, chat template,
image (and video) processor) and DIR/data/ (train/test splits of coloured shapes in the
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

def chat_template(image_text: str, video_text: str = "") -> str:
    """A ChatML template writing `image_text` (and `video_text`, if any) for each vision part.

    The trainer finds assistant spans by rendering prefixes, so no generation markers are needed."""
    video = f"{{%- elif part['type'] == 'video' -%}}{video_text}" if video_text else ""
    return (
        "{%- for message in messages -%}"
        "<|im_start|>{{ message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{image_text}"
        f"{video}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


# Qwen's vision tokens for images and videos; LLaVA writes "<image>", which its processor expands.
CHAT_TEMPLATE = chat_template("<|vision_start|><|image_pad|><|vision_end|>",
                              "<|vision_start|><|video_pad|><|vision_end|>")
LLAVA_IMAGE_TOKEN = "<image>"


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


def build_tokenizer(extra_text: list[str], extra_special: tuple[str, ...] = (), template: str = CHAT_TEMPLATE):
    """A byte-level BPE with Qwen's pre-tokenizer and special tokens (+ `extra_special`), trained on
    the demo's own words."""
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
        vocab_size=600, special_tokens=QWEN_SPECIAL_TOKENS + list(extra_special), show_progress=False,
        initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, extra_special_tokens=QWEN_SPECIAL_TOKENS[1:] + list(extra_special),
    )
    tokenizer.chat_template = template
    return tokenizer


# The language tower of every tiny family; mrope sections (Qwen) must sum to head_dim / 2.
TEXT = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
MROPE = [4, 2, 2]
# Qwen3-VL-MoE: many small experts, so a small batch leaves some of them without tokens on a rank.
# Not square (2 x 16 != 64, 16 != 64): the experts' layout check in transformers relies on shapes.
MOE = dict(num_experts=64, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
QWEN2_PIXELS = 112 * 112  # Qwen2(.5)-VL, patch 14, merge 2: 8 x 8 patches -> 16 image tokens


def _text_config(tokenizer, ids: dict, rope: dict | None = None, **extra) -> dict:
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
    assert sum(rope_parameters.get("mrope_section", [TEXT["head_dim"] // 2])) == TEXT["head_dim"] // 2
    return dict(vocab_size=len(tokenizer), **TEXT, rope_parameters=rope_parameters,
                pad_token_id=ids["<|endoftext|>"], **extra)


def _qwen_token_ids(ids: dict) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen_processor(processor_cls, video_cls, tokenizer, patch: int, merge: int, min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels,
    )
    video_processor = video_cls(patch_size=patch, merge_size=merge, temporal_patch_size=2)
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                         chat_template=tokenizer.chat_template)


def _qwen3(tokenizer, ids: dict, moe: bool = False):
    """Qwen3-VL (the demo model: patch 8, 64x64 images -> 16 image tokens) or Qwen3-VL-MoE."""
    import transformers as tf

    patch, merge = 8, 2
    pixels = IMAGE_SIZE * IMAGE_SIZE
    processor = _qwen_processor(tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor, tokenizer, patch, merge,
                                pixels // 4, pixels)
    config_cls = tf.Qwen3VLMoeConfig if moe else tf.Qwen3VLConfig
    config = config_cls(
        text_config=_text_config(tokenizer, ids, {"mrope_section": MROPE, "mrope_interleaved": True},
                                 **(MOE if moe else {})),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=patch,
            spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=64,
            num_position_embeddings=(IMAGE_SIZE // patch) ** 2, deepstack_visual_indexes=[0],
        ),
        **_qwen_token_ids(ids), tie_word_embeddings=True,
    )
    return config, tf.Qwen3VLMoeForConditionalGeneration if moe else tf.Qwen3VLForConditionalGeneration, processor


def _qwen2(tokenizer, ids: dict, v2_5: bool = False):
    """Qwen2-VL or Qwen2.5-VL with their own processor settings: patch 14, merge 2."""
    import transformers as tf

    processor = _qwen_processor(tf.Qwen2_5_VLProcessor if v2_5 else tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor,
                                tokenizer, 14, 2, QWEN2_PIXELS, QWEN2_PIXELS)
    if v2_5:  # one window of 112 px (4 x 4 merged patches) and a full-attention last block
        vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=112,
                      fullatt_block_indexes=[1])
    else:
        vision = dict(embed_dim=32, hidden_size=64, mlp_ratio=2)
    config_cls = tf.Qwen2_5_VLConfig if v2_5 else tf.Qwen2VLConfig
    config = config_cls(
        text_config=_text_config(tokenizer, ids, {"mrope_section": MROPE}, bos_token_id=None,
                                 eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           **vision),
        **_qwen_token_ids(ids), tie_word_embeddings=True,
    )
    return config, tf.Qwen2_5_VLForConditionalGeneration if v2_5 else tf.Qwen2VLForConditionalGeneration, processor


def _llava(tokenizer, ids: dict):
    """LLaVA (llava-hf layout): a CLIP vision tower (patch 16, features of the second-to-last block), a
    2-layer MLP projector and a Llama language tower; the processor expands "<image>" to 16 tokens."""
    import transformers as tf

    patch = 16
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=tokenizer.chat_template)
    config = tf.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=patch),
        text_config=dict(model_type="llama", **_text_config(tokenizer, ids), bos_token_id=None,
                         eos_token_id=ids["<|im_end|>"]),
        image_token_index=ids[LLAVA_IMAGE_TOKEN], image_seq_length=(IMAGE_SIZE // patch) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return config, tf.LlavaForConditionalGeneration, processor


BUILDERS = {
    "qwen3_vl": _qwen3,
    "qwen3_vl_moe": lambda tokenizer, ids: _qwen3(tokenizer, ids, moe=True),
    "qwen2_5_vl": lambda tokenizer, ids: _qwen2(tokenizer, ids, v2_5=True),
    "qwen2_vl": _qwen2,
    "llava": _llava,
}
FAMILIES = tuple(BUILDERS)


def build_model_dir(out: Path, seed: int = 0, family: str = "qwen3_vl", vocab_size: int = 0,
                    tie_embeddings: bool | None = None) -> Path:
    """Write a tiny random model of `family` (default: the demo's Qwen3-VL) with tokenizer and processor.

    `vocab_size` > 0 gives the model a larger vocabulary than its tokenizer (e.g. Qwen's 151,936, to
    measure the loss's memory at real scale); `tie_embeddings` overrides the family's LM-head tying."""
    import torch
    from transformers import GenerationConfig

    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    words = [caption(c, s) for c in COLORS for s in SHAPES] + [PROMPT.replace("<image>", "")]
    extra = (LLAVA_IMAGE_TOKEN,) if family == "llava" else ()
    tokenizer = build_tokenizer(words, extra, chat_template(LLAVA_IMAGE_TOKEN) if extra else CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + list(extra)}
    config, model_class, processor = BUILDERS[family](tokenizer, ids)
    if vocab_size:
        config.text_config.vocab_size = vocab_size
    if tie_embeddings is not None:
        config.tie_word_embeddings = tie_embeddings
    torch.manual_seed(seed)
    model = model_class(config)
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
    parser.add_argument("--family", default="qwen3_vl", choices=FAMILIES, help="model family of the tiny model")
    args = parser.parse_args(argv)
    out = Path(args.out)
    build_model_dir(out / "model", seed=args.seed, family=args.family)
    build_data_dir(out / "data", args.train_size, args.test_size, seed=args.seed)
    print(f"demo model: {out / 'model'}\ndemo data:  {out / 'data'} (train.jsonl, test.jsonl, *.parquet)")


if __name__ == "__main__":
    main()
