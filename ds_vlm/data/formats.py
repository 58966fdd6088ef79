"""Readers: data files -> records -> Sample(messages, images).

A record is one row of a JSONL/JSON/parquet file. Every supported layout becomes the
same Sample: chat messages whose content is a list of parts ({"type": "image"} or
{"type": "text", "text": ...}) and the images those parts refer to, in order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
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


class RecordFile:
    """Random access to the records of one JSONL, JSON or parquet file, or a `save_to_disk` folder."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"data file {self.path} does not exist")
        suffix = Path(self.path).suffix.lower()
        if is_saved_dataset(self.path) or suffix == ".parquet":
            self._table = _open_table(self.path)
            self._length = self._table.num_rows
        elif suffix == ".jsonl":
            self._offsets = _line_offsets(self.path)
            self._length = len(self._offsets)
        elif suffix == ".json":
            with open(self.path) as f:
                self._rows = json.load(f)
            if not isinstance(self._rows, list):
                raise ValueError(f"{self.path}: a .json data file must hold a list of records")
            self._length = len(self._rows)
        else:
            raise ValueError(f"{self.path}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        if hasattr(self, "_table"):
            return self._table.slice(index, 1).to_pylist()[0]
        if hasattr(self, "_rows"):
            return self._rows[index]
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            line = f.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError("bad_record", self.path, index, f"not valid JSON ({err})") from err

    def __getstate__(self):  # DataLoader workers reopen parquet lazily instead of pickling the table
        state = dict(self.__dict__)
        state.pop("_table", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_length" in state and "_offsets" not in state and "_rows" not in state:
            self._table = _open_table(self.path)


def is_saved_dataset(path: str) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json"))


def _open_table(path: str):
    """A memory-mapped Arrow table; images stay as stored ({bytes, path}), not decoded."""
    if is_saved_dataset(path):
        from datasets import load_from_disk

        return load_from_disk(path).data.table
    import pyarrow.parquet as pq

    return pq.read_table(path, memory_map=True)


def expand_source(path: str) -> list[str]:
    """A data path -> the files it holds: a file, a save_to_disk folder, or a folder of parquet files."""
    if os.path.isdir(path) and not is_saved_dataset(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            raise ValueError(f"{path} holds several splits (a DatasetDict); name one, e.g. {path}/train")
        files = sorted(str(p) for p in Path(path).rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: a folder with no parquet files and no save_to_disk dataset")
        return files
    return [path]


def parse_sources(spec: str) -> list[tuple[str, Optional[float]]]:
    """'a.jsonl:0.7,b.parquet:0.3' -> [(path, weight)]; a weight may be left out (None)."""
    sources = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        path, weight = item, None
        if ":" in item:
            head, tail = item.rsplit(":", 1)
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        if weight is not None and weight <= 0:
            raise ValueError(f"{item}: a sampling weight must be > 0")
        sources.append((path, weight))
    if any(w is None for _, w in sources) and any(w is not None for _, w in sources):
        raise ValueError(f"{spec}: give a weight to every source or to none")
    return sources


def _line_offsets(path: str) -> list[int]:
    offsets, position = [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return offsets


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


def to_sample(record: Any, source: str, index: int, image_root: str = "", data_format: str = "auto") -> Sample:
    """Turn one record of any supported layout into a Sample, or raise DataError."""

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
