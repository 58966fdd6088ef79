"""The built-in offline demo: a tiny Qwen3-VL (or another family) and a synthetic captioning set.

    python -m ds_vlm.demo --out DIR [--family qwen3_vl|qwen3_vl_moe|qwen2_5_vl|qwen2_vl|llava|qwen3_5|qwen3_5_moe]

writes DIR/model/ (config, random safetensors weights, tokenizer, chat template,
image (and video) processor) and DIR/data/ (train/test splits of coloured shapes in the
layout of the Pokemon captions data, as JSONL with image files and as parquet with
the images embedded; with --videos N, also clips of a shape sliding left or right).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

from ds_vlm.models import FAMILIES, adapter_by_family
from ds_vlm.models.qwen3_vl import Qwen3VLAdapter
from ds_vlm.runtime.console import quiet_console
from ds_vlm.testing.chats import QWEN3_MARKERS, QWEN_SPECIAL_TOKENS, ChatSpec, chat_of  # noqa: F401 (benchmarks)
from ds_vlm.testing.tiny import IMAGE_SIZE, SPECS, tiny_model

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
PROMPT = "<image>What is in this picture?"
VIDEO_PROMPT = "<video>Where does it move?"
DIRECTIONS = ("left", "right")

def chat_template(image_text: str, video_text: str = "", thinking: bool = False) -> str:
    """A ChatML template writing `image_text` (and `video_text`, if any) for each vision part.

    `thinking`: Qwen3.5's conventions: each answer opens with its reasoning in a <think> block (empty:
    `<think>\\n\\n</think>\\n\\n`), and the generation prompt opens an empty one unless the caller passes
    `enable_thinking=True` (then `<think>\\n`, and the model reasons first). Unlike the released template, earlier
    turns keep their blocks, so a conversation renders as a growing prefix.

    The trainer finds assistant spans by rendering prefixes, so no generation markers are needed."""
    video = f"{{%- elif part['type'] == 'video' -%}}{video_text}" if video_text else ""
    think = ("{%- if message['role'] == 'assistant' -%}"
             "{{ '<think>\\n' + (message['reasoning_content'] or '') | trim + '\\n</think>\\n\\n' }}{%- endif -%}"
             if thinking else "")
    prompt = ("{%- if enable_thinking is defined and enable_thinking -%}{{ '<think>\\n' }}"
              "{%- else -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}" if thinking else "")
    return (
        "{%- for message in messages -%}"
        "<|im_start|>{{ message['role'] + '\\n' }}"
        f"{think}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{image_text}"
        f"{video}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
        f"{prompt}"
        "{%- endif -%}"
    )


# Qwen's vision tokens for images and videos (LLaVA writes "<image>", which its processor expands).
CHAT_TEMPLATE = chat_template(Qwen3VLAdapter.image_text, Qwen3VLAdapter.video_text)


def caption(color: str, shape: str) -> str:
    return f"A {color} {shape}."


def video_caption(color: str, shape: str, direction: str) -> str:
    return f"A {color} {shape} moving {direction}."


def draw_shape(color: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE, background=None,
               extent: int = 0, at: tuple[int, int] | None = None):
    from PIL import Image, ImageDraw

    background = background or tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    extent = extent or rng.randint(size * 3 // 8, size * 3 // 4)
    x0, y0 = at or (rng.randint(0, size - extent), rng.randint(0, size - extent))
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1)], fill=fill)
    return img


def build_tokenizer(extra_text: list[str], extra_special: tuple[str, ...] = (), template: str = CHAT_TEMPLATE,
                    chat: ChatSpec | None = None, tokenizer_class: str = "Qwen2Tokenizer",
                    markers: tuple[str, ...] = ()):
    """A byte-level BPE with the pre-tokenizer of `tokenizer_class` (Qwen2Tokenizer or Qwen3_5Tokenizer), trained on
    the demo's own words, with `chat`'s special tokens (default Qwen's, + `extra_special`; + `markers` as plain
    added tokens) and `template`."""
    import transformers
    from tokenizers import Tokenizer, models, trainers

    cls = getattr(transformers, tokenizer_class)
    chat = chat or chat_of("qwen3_vl")
    special = list(chat.special) + [t for t in extra_special if t not in chat.special]
    corpus = list(extra_text) * 20 + [
        "user assistant model system What is in this picture? The image shows",
        "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z . , ? !",
    ]
    probe = cls()  # only for its pre-tokenizer and decoder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, show_progress=False,
        initial_alphabet=__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    named = set(chat.named.values()) | {chat.eos, chat.pad, chat.bos}
    extra = [t for t in special[1:] if t not in named] if chat.named else special[1:]
    tokenizer = cls(
        vocab=vocab, merges=merges, eos_token=chat.eos, pad_token=chat.pad, bos_token=chat.bos, unk_token=None,
        extra_special_tokens=dict(chat.named) if chat.named else extra,
    )
    if chat.named:  # named tokens as attributes (a processor reads them); the others as special tokens too
        tokenizer.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    if markers:
        tokenizer.add_tokens(list(markers), special_tokens=False)
    tokenizer.chat_template = template
    return tokenizer


def build_model_dir(out: Path, seed: int = 0, family: str = "qwen3_vl", vocab_size: int = 0,
                    tie_embeddings: bool | None = None, text_overrides: dict | None = None) -> Path:
    """Write a tiny random model of `family` (default: the demo's Qwen3-VL) with tokenizer and processor.

    `vocab_size` > 0 gives the model a larger vocabulary than its tokenizer (e.g. Qwen's 151,936, to
    measure the loss's memory at real scale); `tie_embeddings` overrides the family's LM-head tying;
    `text_overrides` sets language-tower keys (a wider or deeper model; a Qwen vision tower's output width
    follows the hidden size)."""
    import torch
    from transformers import GenerationConfig

    adapter = adapter_by_family(family)
    words = ([caption(c, s) for c in COLORS for s in SHAPES] + [PROMPT.replace("<image>", "")]
             + [video_caption(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
             + [VIDEO_PROMPT.replace("<video>", "")])
    chat = chat_of(family)
    spec = SPECS[family]
    # the generic adapter asks the processor; the tokenizer's named image token, or what the chat spec says
    image_text = adapter.image_text or chat.image_text or chat.named.get("image_token", "")
    # LLaVA's <image> is one more special token; Qwen's image text is three of its own, already special
    extra = () if image_text.strip() in chat.special or image_text.startswith("<|") else (image_text,)
    template = chat.template or chat_template(image_text, adapter.video_text, spec.thinking)
    tokenizer = build_tokenizer(words, extra, template, chat, spec.tokenizer,
                                tuple(QWEN3_MARKERS) if spec.thinking else ())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in list(chat.special) + list(extra)}
    tiny = tiny_model(family, tokenizer, ids)
    config = tiny.config
    if vocab_size:
        config.text_config.vocab_size = vocab_size
    if tie_embeddings is not None:
        config.tie_word_embeddings = tie_embeddings
    for key, value in (text_overrides or {}).items():
        setattr(config.text_config, key, value)
        if key == "hidden_size" and hasattr(config.vision_config, "out_hidden_size"):
            config.vision_config.out_hidden_size = value
    torch.manual_seed(seed)
    model = tiny.model_class(config)
    stop = [ids[t] for t in chat.stop]
    model.generation_config = GenerationConfig(
        eos_token_id=stop[0] if len(stop) == 1 else stop, pad_token_id=ids[chat.pad], do_sample=False,
        **({"bos_token_id": ids[chat.bos]} if chat.bos else {}),
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tiny.processor.save_pretrained(out)
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


def write_video(path: Path, color: str, shape: str, direction: str, rng: random.Random, frames: int = 8,
                fps: int = 4, size: int = IMAGE_SIZE) -> None:
    """An MPEG-4 clip (PyAV) of a shape sliding left or right across the frame."""
    import av

    background = tuple(rng.randint(200, 255) for _ in range(3))
    extent = size * 3 // 8
    y0 = rng.randint(0, size - extent)
    xs = [round(i * (size - extent) / (frames - 1)) for i in range(frames)]
    if direction == "left":
        xs.reverse()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for x in xs:
            img = draw_shape(color, shape, rng, size, background, extent, (x, y0))
            container.mux(stream.encode(av.VideoFrame.from_image(img)))
        container.mux(stream.encode())


def build_video_data(out: Path, n_train: int = 200, n_test: int = 20, seed: int = 0) -> Path:
    """Write video_train/video_test JSONL splits (ShareGPT layout with a `videos` column) and their clips."""
    rng = random.Random(seed + 1)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("test", n_test)):
        with open(out / f"video_{split}.jsonl", "w") as f:
            for i in range(count):
                color, shape, direction = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
                rel = f"videos/{split}_{i:05d}.mp4"
                write_video(out / rel, color, shape, direction, rng)
                f.write(json.dumps({"conversations": [
                    {"from": "human", "value": VIDEO_PROMPT},
                    {"from": "gpt", "value": video_caption(color, shape, direction)}], "videos": [rel]}) + "\n")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write model/ and data/ into")
    parser.add_argument("--train_size", type=int, default=2000)
    parser.add_argument("--test_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", default="qwen3_vl", choices=FAMILIES, help="model family of the tiny model")
    parser.add_argument("--videos", type=int, default=0, metavar="N",
                        help="also write N training clips (and N/10 test clips) as data/video_{train,test}.jsonl")
    args = parser.parse_args(argv)
    quiet_console(rank=0)  # a tool: its own warnings once, no bars redrawn into a log
    out = Path(args.out)
    build_model_dir(out / "model", seed=args.seed, family=args.family)
    build_data_dir(out / "data", args.train_size, args.test_size, seed=args.seed)
    if args.videos:
        build_video_data(out / "data", args.videos, max(1, args.videos // 10), seed=args.seed)
    print(f"demo model: {out / 'model'}\ndemo data:  {out / 'data'} (train.jsonl, test.jsonl, *.parquet"
          + (", video_train.jsonl, video_test.jsonl" if args.videos else "") + ")")


if __name__ == "__main__":
    main()
