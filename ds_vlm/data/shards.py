"""WebDataset tar shards (the layout of LAION/DataComp-style sets): members grouped into samples by key
(`dir/000123.jpg`, `dir/000123.txt`, `dir/000123.json` are one sample), read without extracting.

A shard is indexed once into the data cache (containers.converted): one JSON line per sample with its members'
byte offsets and sizes in the tar, so any record is read by seeking, every rank and worker reads the same
index, and resume stays exact. A sample becomes a record as webdataset hands it over: images (`jpg`, `png`,
`webp`, ...; several in name order) are the record's images as embedded bytes; `txt` (or `caption`, `text`) is
its caption; `json` is the record itself when it holds a conversation in a supported layout, else metadata
(reported as the ignored key `json`); any other member is reported under its extension. Only uncompressed tars
can be read by offset: `.tar.gz` shards are refused by name. A spec may name shards with a range
`shards/train-{000..009}.tar` (webdataset's brace notation) or a glob `shards/*.tar`.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile

IMAGE_SUFFIXES = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
TEXT_SUFFIXES = ("txt", "caption", "text")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_pattern(pattern: str) -> list[str]:
    """`a-{000..009}.tar` -> its 10 names (zero-padded as written), `*.tar` -> the matching files, sorted; a
    plain path -> itself. A named shard that is missing is an error naming it."""
    match = _RANGE.search(pattern)
    if match:
        first, last = match[1], match[2]
        width = len(first) if first.startswith("0") else 0
        names = [name for n in range(int(first), int(last) + 1)
                 for name in expand_pattern(f"{pattern[:match.start()]}{str(n).zfill(width)}{pattern[match.end():]}")]
        missing = [name for name in names if not glob.has_magic(name) and not _exists(name)]
        if missing:
            raise FileNotFoundError(f"{pattern}: {len(missing)} of its {len(names)} files do not exist "
                                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        return names
    if glob.has_magic(pattern):
        names = sorted(glob.glob(pattern))
        if not names:
            raise FileNotFoundError(f"{pattern}: no file matches")
        return names
    return [pattern]


def _exists(path: str) -> bool:
    return os.path.exists(path)


def index_tar(path: str, out: str) -> None:
    """One JSON line per sample of the shard: {"key", "members": {suffix: [offset, size]}}, in shard order."""
    from ds_vlm.data.containers import DataFileError

    if path.lower().endswith((".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")):
        raise DataFileError(f"{path}: a compressed tar cannot be read by offset; decompress it to a .tar")
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                folder, name = posixpath.split(member.name)
                if not member.isfile() or name.startswith("."):
                    continue
                key, _, suffix = name.partition(".")
                samples.setdefault(posixpath.join(folder, key), {})[suffix.lower()] = [member.offset_data, member.size]
    except tarfile.TarError as err:
        raise DataFileError(f"{path}: not a readable tar file ({err})") from err
    with open(out, "w", encoding="utf-8") as f:
        for key, members in samples.items():
            f.write(json.dumps({"key": key, "members": members}) + "\n")


def sample_record(path: str, entry: dict) -> dict:
    """The record of one indexed sample, its members read from the shard by offset."""
    from ds_vlm.data.formats import detect_layout

    members, key = entry["members"], entry["key"]
    record: dict = {}
    with open(path, "rb") as f:
        def read(suffix: str) -> bytes:
            offset, size = members[suffix]
            f.seek(offset)
            return f.read(size)

        used = set()
        images = [s for s in sorted(members) if s.rsplit(".", 1)[-1] in IMAGE_SUFFIXES]
        if "json" in members:
            used.add("json")
            try:
                meta = json.loads(read("json"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"sample {key}: its json member is not valid JSON ({err})") from err
            if isinstance(meta, dict) and detect_layout({**meta, **({"images": []} if images else {})}) != "unknown":
                record.update(meta)
            else:
                record["json"] = meta
        text = next((s for s in TEXT_SUFFIXES if s in members), None)
        if text is not None:
            used.add(text)
            record["text" if "caption" in record else "caption"] = read(text).decode("utf-8").strip()
        if images:
            used.update(images)
            if any(k in record for k in ("images", "image")):
                raise ValueError(f"sample {key}: image members and an 'images' field in its json; give one")
            record["images"] = [{"bytes": read(s), "path": f"{path}/{key}.{s}"} for s in images]
    record.update({suffix or "(no suffix)": f"<{members[suffix][1]} bytes>" for suffix in members
                   if suffix not in used})
    return record
