"""Readers: data files -> records -> Sample(messages, images).

A record is one row of a JSONL/JSON/parquet file. Every supported layout becomes the
same Sample: chat messages whose content is a list of parts ({"type": "image"} or
{"type": "text", "text": ...}) and the images those parts refer to, in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

IMAGE_PLACEHOLDER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "model": "assistant"}


class DataError(ValueError):
    """A bad record, named by file and index; `kind` is one of KINDS."""

    KINDS = ("missing_image", "unreadable_image", "placeholder_mismatch", "no_assistant_turn",
             "too_long", "bad_record")

    def __init__(self, kind: str, source: str, index: int, detail: str):
        assert kind in self.KINDS, kind
        self.kind, self.source, self.index, self.detail = kind, source, index, detail
        super().__init__(f"{source} record {index}: {kind}: {detail}")


@dataclass
class ImageRef:
    """Where one image comes from: a file path or embedded bytes."""

    path: Optional[str] = None
    data: Optional[bytes] = None

    def describe(self) -> str:
        return self.path if self.data is None else f"<{len(self.data)} embedded bytes{' of ' + self.path if self.path else ''}>"


@dataclass
class Sample:
    messages: list[dict]
    images: list[ImageRef] = field(default_factory=list)
    source: str = ""
    index: int = -1


LAYOUTS = ("auto", "sharegpt", "llava", "messages", "openai")


def detect_layout(record: dict) -> str:
    """sharegpt: conversations + images; llava: conversations + image; messages: role/content strings;
    openai: messages whose content is a list of typed parts."""
    if "conversations" in record:
        return "llava" if "image" in record and "images" not in record else "sharegpt"
    turns = record.get("messages")
    if isinstance(turns, list) and any(isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns):
        return "openai"
    return "messages"


def to_sample(record: Any, source: str, index: int, image_root: str = "", data_format: str = "auto",
              insert_placeholders: bool = False) -> Sample:
    """Turn one record of any supported layout into a Sample, or raise DataError. `insert_placeholders`: a
    record with images and no placeholder at all gets one per image at the start of its first user turn
    (what launch/prepare_pokemon.py does to hub data that keeps its images apart from the text)."""

    def bad(kind: str, detail: str) -> DataError:
        return DataError(kind, source, index, detail)

    if not isinstance(record, dict):
        raise bad("bad_record", f"expected an object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise bad("bad_record", "no 'conversations' or 'messages' list")
    if data_format != "auto" and detect_layout(record) != data_format:
        raise bad("bad_record", f"the record is in {detect_layout(record)} layout, not {data_format} (--data_format)")
    root = image_root or os.path.dirname(os.path.abspath(source))
    images_field = record.get("images", record.get("image"))
    if images_field is None:
        images_field = []
    elif not isinstance(images_field, list):
        images_field = [images_field]
    images = [_image_ref(item, root, bad) for item in images_field]

    messages, inline_images = [], []
    for turn in turns:
        if not isinstance(turn, dict):
            raise bad("bad_record", "a turn is not an object")
        role = ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise bad("bad_record", f"unknown speaker {turn.get('from', turn.get('role'))!r}")
        content = turn.get("value", turn.get("content"))
        parts = _content_parts(content, root, inline_images, bad)
        messages.append({"role": role, "content": parts})
    if inline_images:
        if images:
            raise bad("bad_record", "images both inside the messages and in an 'images' field")
        images = inline_images

    placeholders = sum(part["type"] == "image" for m in messages for part in m["content"])
    if insert_placeholders and images and not placeholders:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"][:0] = [{"type": "image"} for _ in images]
            placeholders = len(images)
    if placeholders != len(images):
        raise bad("placeholder_mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
    if not any(m["role"] == "assistant" for m in messages):
        raise bad("no_assistant_turn", "the conversation has no assistant/gpt turn to learn from")
    if any(part["type"] == "image" for m in messages if m["role"] == "assistant" for part in m["content"]):
        raise bad("bad_record", "an image inside an assistant turn cannot be a training target")
    return Sample(messages=messages, images=images, source=source, index=index)


def _content_parts(content, root: str, inline_images: list, bad) -> list[dict]:
    if isinstance(content, str):
        parts = []
        for i, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts
    if isinstance(content, list):  # OpenAI-style list of typed parts
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.extend(_content_parts(part.get("text", ""), root, inline_images, bad))
            elif kind in ("image", "image_url"):
                source = part.get("image", part.get("image_url", part.get("path")))
                if isinstance(source, dict) and "url" in source:
                    source = source["url"]
                if source is not None:
                    inline_images.append(_image_ref(source, root, bad))
                parts.append({"type": "image"})
            else:
                raise bad("bad_record", f"unsupported content part {part!r:.80}")
        return parts
    raise bad("bad_record", f"turn content must be text or a list of parts, got {type(content).__name__}")


def _image_ref(item, root: str, bad) -> ImageRef:
    if isinstance(item, (bytes, bytearray)):
        return ImageRef(data=bytes(item))
    if isinstance(item, dict):
        data, path = item.get("bytes"), item.get("path")
        if data:
            return ImageRef(path=path, data=bytes(data))
        if path:
            return _image_ref(path, root, bad)
        raise bad("bad_record", "an image entry has neither bytes nor path")
    if isinstance(item, str):
        if item.startswith("file://"):
            item = item[len("file://"):]
        if "://" in item:
            raise bad("bad_record", f"image {item!r} is a URL; download it first (nothing is fetched at train time)")
        return ImageRef(path=item if os.path.isabs(item) else os.path.join(root, item))
    raise bad("bad_record", f"an image entry of type {type(item).__name__} is not a path, bytes or {{bytes, path}}")
