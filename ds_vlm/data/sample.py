"""What the readers give: a Sample (messages and the media they refer to), its media references, and the
DataError that names a bad record by file and index."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, AUDIO_PLACEHOLDER = "<image>", "<video>", "<audio>"


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
    """Where one image comes from: a file path or embedded bytes; a record's own pixel bounds for it
    (qwen-vl-utils' per-image `min_pixels`/`max_pixels`, `resized_height`/`resized_width`), if any."""

    path: Optional[str] = None
    data: Optional[bytes] = None
    min_pixels: int = 0
    max_pixels: int = 0
    resized: Optional[tuple[int, int]] = None  # (height, width)

    def describe(self) -> str:
        if self.data is None:
            return self.path
        return f"<{len(self.data)} embedded bytes{' of ' + self.path if self.path else ''}>"


@dataclass
class VideoRef:
    """One video: a file, or its frames as image files (Qwen's list-of-frames form); a record's own sampling
    for it (qwen-vl-utils' `fps`/`sample_fps`, `video_start`/`video_end` in seconds), if any."""

    path: Optional[str] = None
    frames: list[str] = field(default_factory=list)
    fps: float = 0.0
    start: Optional[float] = None
    end: Optional[float] = None

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
