"""The media a record refers to -> ImageRef / VideoRef: paths (relative, absolute, file://, Windows-style
relative), embedded bytes and data: URLs, video files, frame lists and frame folders; a part's own pixel
bounds and video sampling (qwen-vl-utils' keys). Used by formats._Reader; `bad` makes the record's DataError."""

from __future__ import annotations

import base64
import binascii
import os
import re

from ds_vlm.data.sample import ImageRef, VideoRef

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WINDOWS_SEPARATORS = "Windows separators (\\) in a relative media path read as /"
# a part's keys that set how its image or video is read (qwen-vl-utils' spellings), each honoured
IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = ("fps", "sample_fps", "video_start", "video_end")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_WINDOWS_ABSOLUTE = re.compile(r"^([a-zA-Z]:[\\/]|\\\\)")


class MediaReader:
    """Needs `bad(kind, detail)`, `root` (the folder relative paths start from) and `notes` (a list)."""

    def media(self, record: dict, keys: tuple[str, str], make) -> list:
        """The record's `images`/`image` (or `videos`/`video`) field; both given with values is a conflict,
        one of them null or empty reads the other, said in the notes."""
        given = {k: record[k] for k in keys if k in record}
        filled = {k: v for k, v in given.items() if v not in (None, [], "")}
        if len(filled) == 2:
            raise self.bad("bad_record", f"both '{keys[0]}' and '{keys[1]}' hold media ({str(filled[keys[0]])[:60]} "
                                         f"and {str(filled[keys[1]])[:60]}); give one")
        if len(given) == 2 and filled:
            [(used, _)] = filled.items()
            empty = next(k for k in keys if k != used)
            self.notes.append(f"'{empty}' is {given[empty]!r}: the '{used}' field read")
        value = next(iter(filled.values()), None)
        if value is None:
            return []
        return [make(item) for item in (value if isinstance(value, list) else [value])]

    def image_ref(self, item, options: dict | None = None) -> ImageRef:
        ref = self._image_ref(item)
        if options:
            ref.min_pixels, ref.max_pixels = (self._positive(options, k, int) for k in ("min_pixels", "max_pixels"))
            if "resized_height" in options or "resized_width" in options:
                ref.resized = (self._positive(options, "resized_height", int),
                               self._positive(options, "resized_width", int))
                if not all(ref.resized):
                    raise self.bad("bad_record", "an image part with only one of 'resized_height' and "
                                                 "'resized_width'; give both")
        return ref

    def _image_ref(self, item) -> ImageRef:
        if isinstance(item, (bytes, bytearray)):
            return ImageRef(data=bytes(item))
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data:
                if isinstance(data, str):  # base64 text, as JSON exports of Arrow tables write bytes
                    data = self._base64(data, "an embedded image's 'bytes'")
                return ImageRef(path=path, data=bytes(data))
            if path:
                return self._image_ref(path)
            raise self.bad("bad_record", "an image entry has neither bytes nor path")
        if isinstance(item, str):
            if item.startswith("data:"):
                return ImageRef(data=self._data_url(item))
            return ImageRef(path=self.local_path(item, "image"))
        raise self.bad("bad_record", f"an image entry of type {type(item).__name__} is not a path, bytes or "
                                     "{bytes, path}")

    def video_ref(self, item, options: dict | None = None) -> VideoRef:
        ref = self._video_ref(item)
        if options:
            ref.fps = self._positive(options, "fps", float) or self._positive(options, "sample_fps", float)
            ref.start = self._seconds(options, "video_start")
            ref.end = self._seconds(options, "video_end")
            if ref.start is not None and ref.end is not None and ref.end <= ref.start:
                raise self.bad("bad_record", f"video_end {ref.end} is not after video_start {ref.start}")
        return ref

    def _video_ref(self, item) -> VideoRef:
        if isinstance(item, list) and item and all(isinstance(f, str) for f in item):
            return VideoRef(frames=[self.local_path(f, "video frame") for f in item])
        if isinstance(item, dict) and item.get("path"):
            return VideoRef(path=self.local_path(item["path"], "video"))
        if isinstance(item, str):
            path = self.local_path(item, "video")
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

    def local_path(self, item: str, what: str) -> str:
        if item.startswith("file://"):
            item = item[len("file://"):]
        if _URL.match(item):
            raise self.bad("bad_record", f"{what} {item[:80]!r} is a URL: {what}s must be local files (download "
                                         "them beforehand; nothing is fetched at train time)")
        if _WINDOWS_ABSOLUTE.match(item):
            raise self.bad("bad_record", f"{what} {item[:80]!r} is a Windows absolute path; give a path on this "
                                         "machine (or a relative one and --image_root)")
        path = item if os.path.isabs(item) else os.path.join(self.root, item)
        if "\\" in item and not os.path.isabs(item) and not os.path.exists(path):
            path = os.path.normpath(os.path.join(self.root, item.replace("\\", "/")))
            self.notes.append(WINDOWS_SEPARATORS)
        return path

    def _data_url(self, url: str) -> bytes:
        """data:image/png;base64,... -> the image's bytes."""
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not payload:
            raise self.bad("bad_record", f"an embedded image {header[:40]!r}... is not a base64 data: URL")
        return self._base64(payload, f"an embedded image ({header[:40]}, {len(payload)} characters)")

    def _base64(self, payload: str, what: str) -> bytes:
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise self.bad("bad_record", f"{what} does not decode as base64: {err}") from err

    def _positive(self, options: dict, key: str, kind):
        value = options.get(key)
        if value is None:
            return kind(0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.bad("bad_record", f"a media part's '{key}' must be a number > 0, not {value!r}")
        return kind(value)

    def _seconds(self, options: dict, key: str):
        value = options.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise self.bad("bad_record", f"'{key}' must be a number of seconds >= 0, not {value!r}")
        return float(value)
