"""Data files that are not read by line offset as they are, and the checks every text data file gets first.

- A JSON list, a gzip- or zstd-compressed JSONL (`.jsonl.gz`, `.jsonl.zst`) and a CSV/TSV file are converted
  once, streamed, into a JSONL file in the data cache (cache.py), which every rank and worker then reads by
  offset like any JSONL: resume stays exact, nothing is decompressed twice. A CSV/TSV row is a record of its
  columns; a cell holding a JSON list or object (`["a.jpg", "b.jpg"]`, a conversation) is parsed.
- Before that, a text file's encoding and line endings are checked and named with the file: empty files,
  UTF-16/32 (with a BOM, or NUL bytes without one), bytes that are not UTF-8 (cp1252, Latin-1), CR-only line
  endings. UTF-8 with or without a BOM is read.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
from pathlib import Path

import ds_vlm.data.cache as cache

COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
TABLES = {".csv": ",", ".tsv": "\t"}
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32 LE"), (codecs.BOM_UTF32_BE, "UTF-32 BE"), (codecs.BOM_UTF16_LE, "UTF-16 LE"),
         (codecs.BOM_UTF16_BE, "UTF-16 BE"))
_HEAD = 1 << 16


class DataFileError(ValueError):
    """A data file that cannot be read as a whole, named, with the fix."""


def data_suffix(path: str) -> str:
    """'.jsonl', '.json', '.parquet', '.csv', '.tsv', or a compressed JSONL's '.jsonl.gz' / '.jsonl.zst'."""
    name = os.path.basename(path).lower()
    stem, last = os.path.splitext(name)
    if last in COMPRESSED:
        return os.path.splitext(stem)[1] + last
    return last


def check_text(path: str, head: bytes | None = None) -> None:
    """Refuse, naming the file and the fix, a text data file that is empty, not UTF-8, or has CR-only lines."""
    if head is None:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
    if not head.strip():
        raise DataFileError(f"{path}: the file is empty{' (0 bytes)' if not head else ' (only whitespace)'}: no "
                            "records")
    for bom, name in _BOMS:
        if head.startswith(bom):
            raise DataFileError(f"{path}: encoded as {name} (a byte-order mark); data files are read as UTF-8: "
                                f"re-save it as UTF-8 (e.g. `iconv -f {name.split()[0]} -t UTF-8`)")
    if b"\0" in head:
        raise DataFileError(f"{path}: holds NUL bytes (UTF-16 or UTF-32 text without a byte-order mark, or a binary "
                            "file); data files are read as UTF-8")
    not_utf8(path, head[3:] if head.startswith(codecs.BOM_UTF8) else head, at_end=len(head) < _HEAD)
    if path.lower().endswith(".jsonl") and head.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"["):
        raise DataFileError(f"{path}: holds a JSON list, not one record a line: name it .json (a list is read "
                            "from a .json file) or write one record a line")
    if b"\r" in head and b"\n" not in head and len(head.strip().split(b"\r")) > 1:
        raise DataFileError(f"{path}: CR-only line endings (classic Mac OS): the records cannot be told apart; "
                            "convert them to LF (e.g. `tr '\\r' '\\n' < in > out`)")


def not_utf8(path: str, data: bytes, at_end: bool = True, offset: int = 0) -> None:
    """Raise naming the first byte that is not UTF-8 (a multi-byte character cut by the end of `data` is not
    one, unless `at_end`)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        if not at_end and err.start >= len(data) - 3 and err.reason == "unexpected end of data":
            return
        newlines = data.count(b"\n", 0, err.start)
        line = f", line {newlines + 1}" if not offset else ""
        raise DataFileError(f"{path}: not UTF-8: byte 0x{data[err.start]:02x} at byte {offset + err.start}{line} "
                            f"({_guess(data, err.start)}); re-save it as UTF-8 (e.g. `iconv -f cp1252 -t UTF-8`)"
                            ) from None


def _guess(data: bytes, at: int) -> str:
    try:
        return f"cp1252 would read it as {data[max(0, at - 12):at + 12].decode('cp1252', 'replace')!r}"
    except LookupError:  # pragma: no cover - cp1252 is always there
        return "cp1252 or Latin-1 text?"


def converted(path: str, cache_dir: str = "") -> Path:
    """The JSONL file in the data cache that holds `path`'s records (built once), for a JSON list, a compressed
    JSONL or a CSV/TSV file; for a WebDataset tar shard, its index (shards.py)."""
    suffix = data_suffix(path)
    if suffix == ".json":
        build = _json_list
    elif suffix in (".jsonl.gz", ".jsonl.zst"):
        build = _decompress
    elif suffix in TABLES:
        build = _table
    elif suffix.startswith(".tar") or suffix == ".tgz":  # a compressed tar: refused by name there
        from ds_vlm.data.shards import index_tar as build
    else:
        raise DataFileError(f"{path}: no conversion for {suffix!r} files")
    root = cache.writable(cache.cache_root(cache_dir))
    if root is None:  # the cache cannot be written: a temporary folder
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="ds_vlm_index_"))
    return cache.built_once(root / "index" / f"{cache.fingerprint(path)}.jsonl", lambda tmp: build(path, tmp))


def _open_compressed(path: str):
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise DataFileError(f"{path}: a zstd-compressed file needs the `zstandard` package (pip install zstandard), "
                            "or decompress it first (`zstd -d`)") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)


def _decompress(path: str, out: str, chunk: int = 1 << 24) -> None:
    try:
        with _open_compressed(path) as f, open(out, "wb") as g:
            first = True
            while block := f.read(chunk):
                if first:
                    check_text(path, block[:_HEAD])
                    first = False
                g.write(block)
            if first:
                check_text(path, b"")
    except (OSError, EOFError) as err:  # gzip.BadGzipFile, a cut stream, zstd's errors
        raise DataFileError(f"{path}: cannot decompress it ({type(err).__name__}: {err})") from err
    except Exception as err:
        if type(err).__name__ != "ZstdError":
            raise
        raise DataFileError(f"{path}: cannot decompress it (ZstdError: {err})") from err


def _table(path: str, out: str) -> None:
    check_text(path)
    csv.field_size_limit(1 << 30)
    delimiter = TABLES[data_suffix(path)]
    with open(path, encoding="utf-8-sig", newline="") as f, open(out, "w", encoding="utf-8") as g:
        rows = csv.DictReader(f, delimiter=delimiter)
        if not rows.fieldnames:
            raise DataFileError(f"{path}: no header row (the first row names the columns)")
        try:
            for number, row in enumerate(rows):
                if None in row:
                    raise DataFileError(f"{path}: row {number + 1} has more cells than the header has columns")
                g.write(json.dumps({k: _cell(v) for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
        except UnicodeDecodeError as err:
            raise DataFileError(f"{path}: not UTF-8 after row {number}: {err}") from None


def _cell(value: str):
    """A cell as text, or the JSON list or object it holds (a list of image paths, a conversation)."""
    text = value.strip()
    if text[:1] in ("[", "{") and text[-1:] in ("]", "}"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return value


def _json_list(path: str, out: str, chunk: int = 1 << 24) -> None:
    """Stream a JSON list's elements into a JSONL file, 16 MB of text at a time (never the whole list)."""
    check_text(path)
    try:
        _stream_list(path, out, chunk)
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            offset = 0
            while block := f.read(chunk):
                not_utf8(path, block, at_end=len(block) < chunk, offset=offset)
                offset += len(block)
        raise


def _stream_list(path: str, out: str, chunk: int) -> None:
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f, open(out, "w", encoding="utf-8") as g:  # -sig: a BOM is skipped
        buffer, pos, eof, count = f.read(chunk).lstrip(), 0, False, 0
        if not buffer.startswith("["):
            raise DataFileError(f"{path}: a .json data file must hold a list of records")
        pos = 1
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buffer) and not eof:
                buffer, pos = f.read(chunk), 0
                eof = not buffer
                continue
            if pos < len(buffer) and buffer[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buffer, pos)
                after = end
                while after < len(buffer) and buffer[after] in " \t\r\n":
                    after += 1
                # an element ends at a comma or the closing bracket; anything else may be a cut (a number)
                complete = after < len(buffer) and buffer[after] in ",]"
                if not complete and eof:
                    raise json.JSONDecodeError("expected ',' or ']' after a record", buffer, after)
            except json.JSONDecodeError as err:
                if eof:
                    raise DataFileError(f"{path}: not a valid JSON list after record {count} ({err})") from err
                complete = False
            if not complete:
                more = f.read(chunk)
                eof = not more
                buffer, pos = buffer[pos:] + more, 0
                continue
            g.write(json.dumps(value, ensure_ascii=False) + "\n")
            count, pos = count + 1, end
            if pos > chunk:  # drop what was read
                buffer, pos = buffer[pos:], 0
