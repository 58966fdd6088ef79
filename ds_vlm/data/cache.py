"""The data cache: what is worked out once per data file and reused by every rank, worker and later start.

    <root>/index/<key>.jsonl        a JSON list's, compressed JSONL's or CSV/TSV file's records, one per line, or
                                    a WebDataset shard's samples (members' offsets) (built once; read by offset)
    <root>/preflight/<key>.npz      one data file's preflight results, in columns (see preflight.py)

The root is --data_cache, else $DS_VLM_CACHE, else ~/.cache/ds_vlm. A key hashes what the content
depends on: the data file's fingerprint (path, size, mtime and the first and last MB) and, for
preflight, everything that changes encoding (`encoding_key`). An entry is written to a temporary
name and renamed, under a per-entry lock, so concurrent ranks build it once and nobody reads half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Callable, Optional

VERSION = 4  # bump when an entry's layout or meaning changes (3: text spelling control tokens is text; 4: the
# readers of #35: new layouts, placements, weight 0, assistant-first)
_EDGE = 1 << 20  # bytes hashed at each end of a file


def cache_root(configured: str = "") -> Path:
    return Path(configured or os.environ.get("DS_VLM_CACHE") or Path.home() / ".cache" / "ds_vlm").expanduser()


def fingerprint(path: str) -> str:
    """A data file (or folder: every file in it) as a hash of path, size, mtime and its first and last MB."""
    path = os.path.realpath(path)
    digest = hashlib.sha256(f"v{VERSION}:{path}".encode())
    files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else [path]
    for name in files:
        stat = os.stat(name)
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with open(name, "rb") as f:
            digest.update(f.read(_EDGE))
            if stat.st_size > 2 * _EDGE:
                f.seek(-_EDGE, os.SEEK_END)
                digest.update(f.read(_EDGE))
    return digest.hexdigest()[:32]


def tag_suffix(tag: str) -> str:
    """A source's selection, image root and renaming (specs.Source.tag) as part of an entry's name."""
    return "-" + hashlib.sha256(tag.encode()).hexdigest()[:12] if tag else ""


def encoding_key(encoder, data_format: str, image_root: str) -> str:
    """What decides a record's encoding: tokenizer (vocabulary, added tokens, normalization), chat template,
    image and video processor settings (pixel bounds included), model family and what its adapter writes for an image
    and a video (a family without a video path refuses video records), --max_length, --truncation,
    video sampling, record layout and image root."""
    digest = hashlib.sha256(f"v{VERSION}".encode())
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else
                  json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(encoder.processor, "chat_template", None) or getattr(tokenizer, "chat_template", "")
                      ).encode())
    for name in ("image_processor", "video_processor"):
        part = getattr(encoder.processor, name, None)
        if part is not None:
            digest.update(json.dumps(part.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps([type(encoder.adapter).__name__, encoder.adapter.image_text, encoder.adapter.video_text,
                              encoder.max_length, encoder.truncation, encoder.video_sampling.fps,
                              encoder.video_sampling.max_frames, data_format, image_root]).encode())
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def built_once(path: Path, build: Callable[[str], None]) -> Path:
    """`path`, built by `build(temporary_path)` if it does not exist yet: one process builds, the others wait
    for it and reuse it."""
    if path.exists():
        return path
    with _locked(path):
        if not path.exists():
            tmp = temporary_name(path)
            try:
                build(tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    return path


def temporary_name(path: Path) -> str:
    """A name no other process writes to, even on another node sharing the folder."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def writable(root: Path) -> Optional[Path]:
    """The root if entries can be written there, else None (then nothing is cached)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return root
    except OSError:
        return None
