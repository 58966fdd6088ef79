"""Readers: one record of any supported layout -> Sample(messages, images, videos).

Every layout becomes the same Sample: chat messages whose content is a list of parts ({"type": "text",
"text": ...}, {"type": "image"}, {"type": "video"}) and the media those parts refer to, in order.
Layouts (auto-detected per record, or forced by --data_format):
    sharegpt  {"conversations": [{"from": "human", "value": "<image>..."}, ...], "images": [...], "system": ...}
    llava     {"conversations": [...], "image": "coco/1.jpg"}
    messages  {"messages": [{"role": "user", "content": "<image>..."}, ...], "images": [...]}
    openai    {"messages": [{"role": "user", "content": [{"type": "image", "image": ...}, {"type": "text", ...}]}]}
    mantis    Mantis-Instruct's {"conversation": [{"role": ..., "content": "<image>..."}], "images": [...]}
    gemini    {"systemInstruction": {"parts": [...]}, "contents": [{"role": "user", "parts": [{"text": ...},
              {"inlineData": {...}} or {"fileData": {...}}]}, {"role": "model", ...}]}
    bedrock   Bedrock Converse's {"system": [{"text": ...}], "messages": [{"role": ..., "content": [{"text": ...},
              {"image": {"format": "png", "source": {"bytes": ...}}}]}]}
    swift     {"query": ..., "response": ..., "history": [[q, r], ...], "system": ..., "images": [...]}
    alpaca    {"instruction": ..., "input": ..., "output": ..., "history": [[q, r], ...], "system": ...}
    prompt_completion  TRL's: {"prompt": [messages] or text, "completion": [messages] or text, "images": [...]}
              (the prompt masked, assistant turns included; the completion learned; with no placeholder, the
              images go before the first user text, as TRL's collator puts them)
    cauldron  {"images": [...], "texts": [{"user": ..., "assistant": ..., "source": ...}]} (the images go
              before the first user turn: the Cauldron's texts hold no placeholder)
    caption   {"image": ..., "caption" or "text": ...}: the image(s) and --caption_prompt, then the caption learned
A conversation stored as JSON text (a parquet string column) is parsed; MMMU's numbered `<image N>` placeholders
name the images they show. Tool use: read by tool_use.py. Nothing is dropped silently: every key of a record
is used or listed in `Sample.ignored` (preflight and validate count them); what reading changes is in
`Sample.notes`; a text turn that is empty, an audio part, a URL to fetch are errors naming the record.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ds_vlm.data.turns as turns
from ds_vlm.config import choices
from ds_vlm.data.formats_turns import NUMBERED, TurnReader
from ds_vlm.data.sample import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, DataError, ImageRef, Sample, VideoRef  # noqa: F401
from ds_vlm.data.tool_use import record_tools

LAYOUTS = choices("data_format")  # "auto" and the layouts below
# Keys each layout reads at the top of a record (media keys are read by every layout).
LAYOUT_KEYS = {"sharegpt": {"conversations"}, "llava": {"conversations"}, "messages": {"messages"},
               "openai": {"messages"}, "mantis": {"conversation"},
               "gemini": {"contents", "systemInstruction", "system_instruction"},
               "bedrock": {"messages", "schemaVersion"}, "swift": {"query", "response", "history"},
               "alpaca": {"instruction", "input", "output", "history"},
               "prompt_completion": {"prompt", "completion"}, "cauldron": {"texts"}, "caption": {"caption", "text"}}
MEDIA_KEYS = {"images", "image", "videos", "video", "audios", "audio", "system", "tools"}
# placements of images a record keeps apart from its text, each as its project does it
PLACED = {"trl": "images placed before the first user text (TRL's placement)",
          "internvl": "<image>\\n put before the first turn's text (InternVL's placement)",
          "cauldron": "images placed before the first question (the Cauldron's texts hold no placeholder)",
          "caption": "", "insert": ""}
_JSON_TEXT_KEYS = ("conversations", "messages", "conversation", "contents", "texts", "images", "videos")
ASSISTANT_FIRST = "an opening assistant turn (nothing before it to answer) kept as context, not learned"


def _content_blocks(turns) -> list:
    return [p for t in turns if isinstance(t, dict) and isinstance(t.get("content"), list) for p in t["content"]]


def detect_layout(record: dict) -> str:
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "texts" in record and isinstance(record["texts"], list):
        return "cauldron"
    if "conversations" in record:
        return "llava" if "image" in record and "images" not in record else "sharegpt"
    if "conversation" in record:
        return "mantis"
    if "contents" in record:
        return "gemini"
    if "messages" in record:
        blocks = _content_blocks(record["messages"] if isinstance(record["messages"], list) else [])
        if "schemaVersion" in record or any(isinstance(b, dict) and "type" not in b for b in blocks):
            return "bedrock"
        return "openai" if blocks else "messages"
    if "query" in record or "response" in record:
        return "swift"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if any(k in record for k in ("caption", "text")) and any(k in record for k in ("image", "images")):
        return "caption"
    return "unknown"


def to_sample(record: Any, source: str, index: int, image_root: str = "", data_format: str = "auto",
              insert_placeholders: bool = False, placement: str = "", caption_prompt: str = "") -> Sample:
    """Turn one record of any supported layout into a Sample, or raise DataError. A record with images and no
    placeholder at all gets them placed as its project does (`placement`: "internvl" for an InternVL meta
    file's records; TRL's, the Cauldron's and captions' by their layout); `insert_placeholders`: one per image
    at the start of its first user turn (what launch/prepare_pokemon.py does to hub data)."""
    reader = _Reader(source, index, image_root or os.path.dirname(os.path.abspath(source)))
    if not isinstance(record, dict):
        raise reader.bad("bad_record", f"expected an object, got {type(record).__name__}")
    record = reader.parse_json_text(record)
    layout = detect_layout(record)
    if layout == "unknown":
        raise reader.bad("bad_record", f"no conversation in it (keys {sorted(record)[:8]}); supported layouts: "
                                       f"{', '.join(LAYOUTS[1:])}")
    if data_format != "auto" and layout != data_format:
        raise reader.bad("bad_record", f"the record is in {layout} layout, not {data_format} (--data_format)")
    messages = reader.messages(record, layout, caption_prompt)
    images = reader.media(record, ("images", "image"), reader.image_ref)
    videos = reader.media(record, ("videos", "video"), reader.video_ref)
    if any(record.get(key) for key in ("audios", "audio")):
        raise reader.bad("unsupported_media", "audio is not supported (an 'audios' field)")
    if reader.inline_images or reader.inline_videos:
        if images or videos:
            raise reader.bad("bad_record", "media both inside the messages and in an 'images'/'videos' field")
        images, videos = reader.inline_images, reader.inline_videos
    images = reader.numbered(messages, images)
    how = {"prompt_completion": "trl", "cauldron": "cauldron", "caption": "caption"}.get(layout, placement)
    if insert_placeholders:
        how = "insert"
    placed = how and turns.insert_placeholders(messages, images, newline=how == "internvl", only_one=how == "internvl")
    if placed and PLACED[how]:
        reader.notes.append(PLACED[how])
    reader.notes += turns.video_behind_image_placeholders(messages, images, videos)
    _check_counts(reader, messages, images, videos, how)
    if messages[0]["role"] == "assistant" and messages[0]["learn"]:
        messages[0]["learn"] = False
        reader.notes.append(ASSISTANT_FIRST)
    if not any(m["role"] == "assistant" and m["learn"] for m in messages):
        why = ""
        if any(m["role"] == "assistant" for m in messages[1:]):
            why = " (every one has 'loss': false or 'weight': 0)"
        elif messages[0]["role"] == "assistant":
            why = " (its only assistant turn opens the conversation, with nothing before it to answer)"
        raise reader.bad("no_assistant_turn", "the conversation has no assistant/gpt turn to learn from" + why)
    if any(part["type"] != "text" for m in messages if m["role"] == "assistant" for part in m["content"]):
        raise reader.bad("bad_record", "an image or video inside an assistant turn cannot be a training target")
    reader.notes += turns.drop_trailing_user_turns(messages, images, videos)
    ignored = sorted(set(record) - LAYOUT_KEYS[layout] - MEDIA_KEYS) + sorted(reader.ignored)
    return Sample(messages=messages, images=images, source=source, index=index, videos=videos,
                  ignored=tuple(ignored), notes=reader.notes, tools=record_tools(record, reader.bad))


def _has_content(message: dict) -> bool:
    return any(part["type"] != "text" or part["text"].strip() for part in message["content"])


def _check_counts(reader, messages: list[dict], images: list, videos: list, placement: str) -> None:
    counted = {kind: sum(part["type"] == kind for m in messages for part in m["content"])
               for kind in ("image", "video")}
    if counted["image"] == len(images) and counted["video"] == len(videos):
        return
    said = []
    for kind, refs, placeholder in (("image", images, IMAGE_PLACEHOLDER), ("video", videos, VIDEO_PLACEHOLDER)):
        if counted[kind] or refs:  # the media named, so that a video behind an <image> is seen
            named = (f" ({', '.join(r.describe() for r in refs[:2])}{', ...' if len(refs) > 2 else ''})"
                     if refs else "")
            said.append(f"{counted[kind]} {placeholder} placeholder(s) but {len(refs)} {kind}(s){named}")
    if not counted["image"] and len(images) > 1 and placement == "internvl":
        said.append("InternVL puts <image>\\n in front of a single image only; a record of several needs its "
                    "placeholders")
    elif not counted["image"] and images and not placement:
        said.append("images with no placeholder are placed only where the layout's project places them (TRL's "
                    "prompt/completion, the Cauldron, captions, an InternVL meta file's single image)")
    raise reader.bad("placeholder_mismatch", "; ".join(said))


class _Reader(TurnReader):
    """Reads one record, keeping what it found inside the turns, the keys it did not use and its notes."""

    def __init__(self, source: str, index: int, root: str):
        self.source, self.index, self.root = source, index, root
        self.inline_images: list[ImageRef] = []
        self.inline_videos: list[VideoRef] = []
        self.ignored: set[str] = set()
        self.notes: list[str] = []

    def bad(self, kind: str, detail: str) -> DataError:
        return DataError(kind, self.source, self.index, detail)

    def parse_json_text(self, record: dict) -> dict:
        """A conversation kept as JSON text (a string column of a parquet or CSV file) -> its list."""
        found = {k: record[k] for k in _JSON_TEXT_KEYS if isinstance(record.get(k), str)
                 and record[k].lstrip().startswith("[")}
        if not found:
            return record
        record = dict(record)
        for key, text in found.items():
            try:
                record[key] = json.loads(text)
            except json.JSONDecodeError as err:
                raise self.bad("bad_record", f"'{key}' is text that starts like a JSON list but is not JSON "
                                             f"({err})") from err
            self.notes.append(f"'{key}' read from JSON text")
        return record

    def messages(self, record: dict, layout: str, caption_prompt: str = "") -> list[dict]:
        if layout == "caption":
            return self._caption(record, caption_prompt)
        messages = [self.message(turn, i) for i, turn in enumerate(self.layout_turns(record, layout))]
        messages = [m for m in messages if m["role"] != "system" or _has_content(m)]  # an empty one is none
        system = record.get("system")
        if layout == "gemini":
            given = record.get("systemInstruction", record.get("system_instruction"))
            system = self.gemini_system(given) if given is not None else system
        elif layout == "bedrock" and isinstance(system, list):
            system = self.bedrock_system(system)
        if system is not None:
            if not isinstance(system, str):
                raise self.bad("bad_record", f"the 'system' field is not text ({type(system).__name__})")
            if not system.strip():  # LLaMA-Factory's reading: an empty system prompt is none
                return messages
            if any(m["role"] == "system" for m in messages):
                raise self.bad("bad_record", "both a 'system' field and a system turn; give one")
            content = self.parts(system, "system field", placeholders=False)
            messages.insert(0, {"role": "system", "content": content, "learn": False})
        return messages

    def _caption(self, record: dict, prompt: str) -> list[dict]:
        """An image-caption pair (the alignment-pretraining layout): the images (placed later) and the prompt
        as the user turn, the caption learned."""
        key = "caption" if "caption" in record else "text"
        caption = record[key]
        if not isinstance(caption, str) or not caption.strip():
            raise self.bad("bad_record", f"'{key}' is empty or not text")
        user = self.parts(prompt, "--caption_prompt", allow_empty=True)
        return [{"role": "user", "content": user, "learn": False},
                {"role": "assistant", "content": self.parts(caption, f"the {key}"), "learn": True}]

    def numbered(self, messages: list[dict], images: list) -> list:
        """MMMU's `<image N>`: the images in the order the text shows them (one repeated where it is named twice).
        Mixed with plain `<image>` placeholders, or a number with no image, is refused."""
        parts = [p for m in messages for p in m["content"] if p["type"] == "image"]
        numbers = [p.pop("number") for p in parts if "number" in p]
        if not numbers:
            return images
        if len(numbers) != len(parts):
            raise self.bad("placeholder_mismatch", "numbered <image N> and plain <image> placeholders mixed")
        if max(numbers) > len(images) or min(numbers) < 1:
            raise self.bad("placeholder_mismatch", f"<image {max(numbers)}> but {len(images)} image(s)")
        unused = sorted(set(range(1, len(images) + 1)) - set(numbers))
        if unused:
            raise self.bad("placeholder_mismatch", f"image(s) {unused} are never shown by an <image N> placeholder")
        self.notes.append(NUMBERED)
        return [images[n - 1] for n in numbers]
