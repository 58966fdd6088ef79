"""Readers: one record of any supported layout -> Sample(messages, images, videos).

Every layout becomes the same Sample: chat messages whose content is a list of parts ({"type": "text",
"text": ...}, {"type": "image"}, {"type": "video"}) and the media those parts refer to, in order.
Layouts (auto-detected per record, or forced by --data_format):
    sharegpt  {"conversations": [{"from": "human", "value": "<image>..."}, ...], "images": [...], "system": ...}
    llava     {"conversations": [...], "image": "coco/1.jpg"}
    messages  {"messages": [{"role": "user", "content": "<image>..."}, ...], "images": [...]}
    openai    {"messages": [{"role": "user", "content": [{"type": "image", "image": ...}, {"type": "text", ...}]}]}
    swift     {"query": ..., "response": ..., "history": [[q, r], ...], "system": ..., "images": [...]}
    alpaca    {"instruction": ..., "input": ..., "output": ..., "history": [[q, r], ...], "system": ...}
    prompt_completion  TRL's: {"prompt": [messages] or text, "completion": [messages] or text, "images": [...]}
              (the prompt masked, assistant turns included; the completion learned)
    cauldron  {"images": [...], "texts": [{"user": ..., "assistant": ..., "source": ...}]} (the images go
              before the first user turn: the Cauldron's texts hold no placeholder)
Tool use (sharegpt's `function_call` and `observation` turns, messages/openai's `tool_calls` and `tool`
messages, a `tools` field): read by tool_use.py.
Nothing is dropped silently: every key of a record is used or listed in `Sample.ignored` (preflight and
validate count them); a text turn that is empty, an audio part, a URL to fetch are errors naming the record.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import choices
from . import turns
from .tool_use import record_tools, tool_calls

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER = "<image>", "<video>", "<audio>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "model": "assistant", "observation": "tool", "tool": "tool",
              "function_call": "assistant"}
LAYOUTS = choices("data_format")  # "auto" and the layouts below
# Keys each layout reads at the top of a record (media keys are read by every layout).
LAYOUT_KEYS = {"sharegpt": {"conversations"}, "llava": {"conversations"}, "messages": {"messages"},
               "openai": {"messages"}, "swift": {"query", "response", "history"},
               "alpaca": {"instruction", "input", "output", "history"},
               "prompt_completion": {"prompt", "completion"}, "cauldron": {"texts"}}
MEDIA_KEYS = {"images", "image", "videos", "video", "audios", "audio", "system", "tools"}
TURN_KEYS = {"from", "role", "value", "content", "loss", "tool_calls", "tool_call_id", "name"}
PART_KEYS = {"type", "text", "value", "image", "image_url", "url", "path", "video", "video_url"}
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_PLACEHOLDERS = re.compile(f"({IMAGE_PLACEHOLDER}|{VIDEO_PLACEHOLDER}|{AUDIO_PLACEHOLDER})")


class DataError(ValueError):
    """A bad record, named by file and index; `kind` is one of KINDS."""

    KINDS = ("missing_image", "unreadable_image", "missing_video", "unreadable_video", "placeholder_mismatch",
             "no_assistant_turn", "too_long", "unsupported_media", "bad_record")

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
        if self.data is None:
            return self.path
        return f"<{len(self.data)} embedded bytes{' of ' + self.path if self.path else ''}>"


@dataclass
class VideoRef:
    """One video: a file, or its frames as image files (Qwen's list-of-frames form)."""

    path: Optional[str] = None
    frames: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return self.path or f"<{len(self.frames)} frames from {self.frames[0] if self.frames else '?'}>"


@dataclass
class Sample:
    messages: list[dict]  # {"role", "content": [parts], "learn": bool (assistant turns)}
    images: list[ImageRef] = field(default_factory=list)
    source: str = ""
    index: int = -1
    videos: list[VideoRef] = field(default_factory=list)
    ignored: tuple[str, ...] = ()  # keys of the record nothing read ("id", "turn.weight", ...)
    tools: Optional[list] = None  # the tools a tool-use conversation may call (the chat template's `tools`)
    notes: list[str] = field(default_factory=list)  # what was changed on the way in, counted by preflight


def detect_layout(record: dict) -> str:
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "texts" in record and isinstance(record["texts"], list):
        return "cauldron"
    if "conversations" in record:
        return "llava" if "image" in record and "images" not in record else "sharegpt"
    if "messages" in record:
        turns = record["messages"]
        typed = isinstance(turns, list) and any(isinstance(t, dict) and isinstance(t.get("content"), list)
                                                for t in turns)
        return "openai" if typed else "messages"
    if "query" in record or "response" in record:
        return "swift"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return "unknown"


def to_sample(record: Any, source: str, index: int, image_root: str = "", data_format: str = "auto",
              insert_placeholders: bool = False) -> Sample:
    """Turn one record of any supported layout into a Sample, or raise DataError. `insert_placeholders`: a
    record with images and no placeholder at all gets one per image at the start of its first user turn
    (what launch/prepare_pokemon.py does to hub data that keeps its images apart from the text)."""
    reader = _Reader(source, index, image_root or os.path.dirname(os.path.abspath(source)))
    if not isinstance(record, dict):
        raise reader.bad("bad_record", f"expected an object, got {type(record).__name__}")
    layout = detect_layout(record)
    if layout == "unknown":
        raise reader.bad("bad_record", f"no conversation in it (keys {sorted(record)[:8]}); supported layouts: "
                                       f"{', '.join(LAYOUTS[1:])}")
    if data_format != "auto" and layout != data_format:
        raise reader.bad("bad_record", f"the record is in {layout} layout, not {data_format} (--data_format)")
    messages = reader.messages(record, layout)
    images = reader.media(record, ("images", "image"), reader.image_ref)
    videos = reader.media(record, ("videos", "video"), reader.video_ref)
    if any(record.get(key) for key in ("audios", "audio")):
        raise reader.bad("unsupported_media", "audio is not supported (an 'audios' field)")
    if reader.inline_images or reader.inline_videos:
        if images or videos:
            raise reader.bad("bad_record", "media both inside the messages and in an 'images'/'videos' field")
        images, videos = reader.inline_images, reader.inline_videos
    turns.insert_placeholders(messages, images, insert_placeholders or layout == "cauldron")
    notes = turns.video_behind_image_placeholders(messages, images, videos)
    counted = {kind: sum(part["type"] == kind for m in messages for part in m["content"])
               for kind in ("image", "video")}
    if counted["image"] != len(images) or counted["video"] != len(videos):
        said = []
        for kind, refs, placeholder in (("image", images, IMAGE_PLACEHOLDER), ("video", videos, VIDEO_PLACEHOLDER)):
            if counted[kind] or refs:  # the media named, so that a video behind an <image> is seen
                named = (f" ({', '.join(r.describe() for r in refs[:2])}{', ...' if len(refs) > 2 else ''})"
                         if refs else "")
                said.append(f"{counted[kind]} {placeholder} placeholder(s) but {len(refs)} {kind}(s){named}")
        raise reader.bad("placeholder_mismatch", "; ".join(said))
    if not any(m["role"] == "assistant" and m["learn"] for m in messages):
        raise reader.bad("no_assistant_turn", "the conversation has no assistant/gpt turn to learn from"
                         + (" (every one has 'loss': false)" if any(m["role"] == "assistant" for m in messages)
                            else ""))
    if any(part["type"] != "text" for m in messages if m["role"] == "assistant" for part in m["content"]):
        raise reader.bad("bad_record", "an image or video inside an assistant turn cannot be a training target")
    notes += turns.drop_trailing_user_turns(messages, images, videos)
    ignored = sorted(set(record) - LAYOUT_KEYS[layout] - MEDIA_KEYS) + sorted(reader.ignored)
    return Sample(messages=messages, images=images, source=source, index=index, videos=videos,
                  ignored=tuple(ignored), notes=notes, tools=record_tools(record, reader.bad))


class _Reader:
    """Reads one record, keeping what it found inside the turns and the keys it did not use."""

    def __init__(self, source: str, index: int, root: str):
        self.source, self.index, self.root = source, index, root
        self.inline_images: list[ImageRef] = []
        self.inline_videos: list[VideoRef] = []
        self.ignored: set[str] = set()

    def bad(self, kind: str, detail: str) -> DataError:
        return DataError(kind, self.source, self.index, detail)

    # -- turns --------------------------------------------------------------------------------
    def messages(self, record: dict, layout: str) -> list[dict]:
        turns = self._turns(record, layout)
        messages = [self._message(turn, i) for i, turn in enumerate(turns)]
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str) or not system.strip():
                raise self.bad("bad_record", "the 'system' field is empty or not text")
            if any(m["role"] == "system" for m in messages):
                raise self.bad("bad_record", "both a 'system' field and a system turn; give one")
            messages.insert(0, {"role": "system", "content": self._parts(system, "system field"), "learn": False})
        return messages

    def _turns(self, record: dict, layout: str) -> list[dict]:
        if layout == "prompt_completion":  # TRL: the prompt (any turns) masked, the completion learned
            prompt, completion = record["prompt"], record["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            if not (isinstance(prompt, list) and isinstance(completion, list) and completion):
                raise self.bad("bad_record", "'prompt' and 'completion' must both be text or both lists of messages")
            masked = [{**t, "loss": False} if isinstance(t, dict) and t.get("role") == "assistant" else t
                      for t in prompt]
            return [*masked, *completion]
        if layout == "cauldron":
            turns = []
            for number, pair in enumerate(record["texts"]):
                if not isinstance(pair, dict) or not {"user", "assistant"} <= set(pair):
                    raise self.bad("bad_record", f"texts[{number}] is not a {{user, assistant}} pair")
                self.ignored.update(f"texts.{key}" for key in pair if key not in ("user", "assistant"))
                turns += [{"role": "user", "content": pair["user"]},
                          {"role": "assistant", "content": pair["assistant"]}]
            if not turns:
                raise self.bad("bad_record", "'texts' holds no {user, assistant} pair")
            return turns
        if layout in ("sharegpt", "llava", "messages", "openai"):
            turns = record["conversations" if layout in ("sharegpt", "llava") else "messages"]
            if not isinstance(turns, list) or not turns:
                raise self.bad("bad_record", "the conversation is not a non-empty list of turns")
            return turns
        history = record.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
            raise self.bad("bad_record", "'history' must be a list of [query, response] pairs")
        if layout == "swift":
            query, response = record.get("query"), record.get("response")
        else:  # alpaca: the instruction, then the input on its own line (LLaMA-Factory's joining)
            query = "\n".join(str(x) for x in (record.get("instruction"), record.get("input")) if x)
            response = record.get("output")
        pairs = [*history, (query, response)]
        return [{"role": role, "content": text} for q, r in pairs for role, text in (("user", q), ("assistant", r))]

    def _message(self, turn, number: int) -> dict:
        if not isinstance(turn, dict):
            raise self.bad("bad_record", f"turn {number} is not an object")
        self.ignored.update(f"turn.{key}" for key in turn if key not in TURN_KEYS)
        speaker = turn.get("from", turn.get("role"))
        role = ROLE_NAMES.get(str(speaker).lower())
        if role is None:
            raise self.bad("bad_record", f"turn {number}: unknown speaker {speaker!r}")
        content = turn.get("value", turn.get("content"))
        if str(speaker).lower() == "function_call":  # LLaMA-Factory's: the calls as JSON text, no content
            calls, content = tool_calls(content, True, number, self.bad), None
        else:
            calls = tool_calls(turn.get("tool_calls"), False, number, self.bad)
        parts = self._parts(content, f"turn {number} ({role})", allow_empty=bool(calls))
        loss = turn.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise self.bad("bad_record", f"turn {number}: 'loss' must be true or false, not {loss!r}")
        if loss and role != "assistant":
            raise self.bad("bad_record", f"turn {number} ({role}): 'loss': true on a turn that is not the "
                                         "assistant's; only assistant turns are learned")
        message = {"role": role, "content": parts, "learn": role == "assistant" and loss is not False}
        if calls:
            message["tool_calls"] = calls
        message.update({key: turn[key] for key in ("name", "tool_call_id") if role == "tool" and key in turn})
        return message

    # -- content --------------------------------------------------------------------------------
    def _parts(self, content, where: str, allow_empty: bool = False) -> list[dict]:
        if isinstance(content, list):
            parts = [p for part in content for p in self._typed_part(part, where)]
        elif isinstance(content, str):
            parts = self._text_parts(content, where)
        elif content is None:
            parts = []
        else:
            raise self.bad("bad_record", f"{where}: content must be text or a list of parts, not "
                                         f"{type(content).__name__}")
        if not allow_empty and not any(p["type"] != "text" or p["text"].strip() for p in parts):
            raise self.bad("bad_record", f"{where} is empty")
        return parts

    def _text_parts(self, text: str, where: str) -> list[dict]:
        """A string with <image>/<video> placeholders -> parts; <audio> is refused."""
        parts = []
        for piece in _PLACEHOLDERS.split(text):
            if piece == AUDIO_PLACEHOLDER:
                raise self.bad("unsupported_media", f"{where}: an {AUDIO_PLACEHOLDER} placeholder; audio is not "
                                                    "supported")
            if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                parts.append({"type": piece[1:-1]})
            elif piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def _typed_part(self, part, where: str) -> list[dict]:
        """OpenAI-style parts, in the spellings peers use: text under "text" or "value"; an image under "image",
        "image_url" ({"url": ...} or a string), "url", "path" or "value"; a video likewise."""
        if not isinstance(part, dict) or "type" not in part:
            raise self.bad("bad_record", f"{where}: a content part without a 'type': {str(part)[:60]}")
        self.ignored.update(f"part.{key}" for key in part if key not in PART_KEYS)
        kind = part["type"]
        if kind == "text":
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise self.bad("bad_record", f"{where}: a text part with no text (under 'text' or 'value')")
            return self._text_parts(text, where)
        if kind in ("image", "image_url", "video", "video_url"):
            media = "image" if kind.startswith("image") else "video"
            value = next((part[k] for k in (kind, f"{media}_url", "url", "path", "value") if k in part), None)
            if isinstance(value, dict):
                value = value.get("url", value.get("path", value.get("bytes")))
            if value is not None:  # a part without its media refers to the record's images/videos field
                refs = self.inline_images if media == "image" else self.inline_videos
                refs.append(self.image_ref(value) if media == "image" else self.video_ref(value))
            return [{"type": media}]
        if kind in ("audio", "input_audio", "audio_url"):
            raise self.bad("unsupported_media", f"{where}: an audio part; audio is not supported")
        raise self.bad("bad_record", f"{where}: unsupported content part type {kind!r}")

    # -- media ----------------------------------------------------------------------------------
    def media(self, record: dict, keys: tuple[str, str], make) -> list:
        value = next((record[k] for k in keys if k in record), None)
        if value is None:
            return []
        return [make(item) for item in (value if isinstance(value, list) else [value])]

    def image_ref(self, item) -> ImageRef:
        if isinstance(item, (bytes, bytearray)):
            return ImageRef(data=bytes(item))
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data:
                return ImageRef(path=path, data=bytes(data))
            if path:
                return self.image_ref(path)
            raise self.bad("bad_record", "an image entry has neither bytes nor path")
        if isinstance(item, str):
            if item.startswith("data:"):
                return ImageRef(data=self._data_url(item))
            return ImageRef(path=self._local_path(item, "image"))
        raise self.bad("bad_record", f"an image entry of type {type(item).__name__} is not a path, bytes or "
                                     "{bytes, path}")

    def video_ref(self, item) -> VideoRef:
        if isinstance(item, list) and item and all(isinstance(f, str) for f in item):
            return VideoRef(frames=[self._local_path(f, "video frame") for f in item])
        if isinstance(item, dict) and item.get("path"):
            return VideoRef(path=self._local_path(item["path"], "video"))
        if isinstance(item, str):
            path = self._local_path(item, "video")
            if os.path.isdir(path):  # a folder of frames (LLaVA-Video, ShareGPT4Video): its images in name order
                frames = sorted(os.path.join(path, f) for f in os.listdir(path)
                                if os.path.splitext(f)[1].lower() in FRAME_SUFFIXES)
                if not frames:
                    raise self.bad("missing_video", f"video folder {path} holds no frame images "
                                                    f"({', '.join(FRAME_SUFFIXES)})")
                return VideoRef(path=path, frames=frames)
            return VideoRef(path=path)
        raise self.bad("bad_record", f"a video entry of type {type(item).__name__} is not a path or a list of "
                                     "frame paths")

    def _local_path(self, item: str, what: str) -> str:
        if item.startswith("file://"):
            item = item[len("file://"):]
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", item):
            raise self.bad("bad_record", f"{what} {item[:80]!r} is a URL: {what}s must be local files (download "
                                         "them beforehand; nothing is fetched at train time)")
        return item if os.path.isabs(item) else os.path.join(self.root, item)

    def _data_url(self, url: str) -> bytes:
        """data:image/png;base64,... -> the image's bytes."""
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise self.bad("bad_record", f"an embedded image {header[:40]!r}... is not a base64 data: URL")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise self.bad("bad_record", f"an embedded image ({header[:40]}, {len(payload)} characters) does not "
                                         f"decode as base64: {err}") from err
