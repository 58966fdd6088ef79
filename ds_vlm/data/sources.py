"""Data sources -> records: files and folders, random access to each record, several sources as one index.

A record is one row of a JSONL/JSON/parquet/CSV file or of a `save_to_disk` folder; `RecordIndex.sample`
turns one into a Sample through the readers of `formats.py`. Nothing holds all records in memory: a JSONL
file is read by line offsets (a numpy array), a JSON list, a compressed JSONL or a CSV/TSV file is converted
once into a JSONL file in the data cache (containers.py) and read the same way, parquet and `save_to_disk`
tables are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

import ds_vlm.data.cache as cache
from ds_vlm.data.containers import DataFileError, check_text, converted, data_suffix
from ds_vlm.data.formats import DataError, Sample, to_sample
from ds_vlm.data.shards import expand_pattern, sample_record
from ds_vlm.data.specs import HUB_PREFIX, Remap, Source, parse_spec, select_rows


class RecordFile:
    """Random access to the records of one JSONL, JSON or parquet file, or a `save_to_disk` folder."""

    def __init__(self, path: str, cache_dir: str = ""):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"data file {self.path} does not exist")
        suffix = data_suffix(self.path)
        self._lines = self.path  # the JSONL file read by offset (for a JSON list, CSV, .jsonl.gz: its converted copy)
        self._shard = suffix == ".tar"  # a WebDataset shard: _lines is its index, a line a sample's members
        if is_saved_dataset(self.path) or suffix == ".parquet":
            self._table = _open_table(self.path)
            self._length = self._table.num_rows
        elif suffix == ".jsonl":
            check_text(self.path)
            self._offsets = line_offsets(self.path)
            self._length = len(self._offsets)
        elif suffix in (".json", ".jsonl.gz", ".jsonl.zst", ".csv", ".tsv", ".tgz") or suffix.startswith(".tar"):
            self._lines = str(converted(self.path, cache_dir))
            self._offsets = line_offsets(self._lines)
            self._length = len(self._offsets)
        else:
            raise DataFileError(f"{self.path}: unsupported data file type {suffix!r} (use .jsonl, .json, .parquet, "
                                ".csv, .tsv, .jsonl.gz, .jsonl.zst or WebDataset .tar shards)")
        if not self._length:
            raise DataFileError(f"{self.path}: no records in it")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        if hasattr(self, "_table"):
            return self._table.slice(index, 1).to_pylist()[0]
        with open(self._lines, "rb") as f:
            f.seek(int(self._offsets[index]))
            line = f.readline()
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            where = ""
            if self._lines == self.path:  # JSONL: the line in the user's file (blank lines are not records)
                where = f"line {self.line_number(index)}: "
            if isinstance(err, UnicodeDecodeError):
                raise DataError("bad_record", self.path, index, f"{where}not UTF-8: byte 0x{line[err.start]:02x} "
                                f"at column {err.start + 1} (cp1252 or Latin-1 text?); re-save the file as UTF-8"
                                ) from err
            raise DataError("bad_record", self.path, index, f"{where}not valid JSON ({err})") from err
        return sample_record(self.path, record) if self._shard else record

    def line_number(self, index: int) -> int:
        """The 1-based line of record `index` in the JSONL file (counted only when asked: an error)."""
        offset, count = int(self._offsets[index]), 0
        with open(self._lines, "rb") as f:
            while offset > 0:
                block = f.read(min(offset, 1 << 24))
                count += block.count(b"\n")
                offset -= len(block)
        return count + 1

    def fingerprint(self) -> str:
        """What the preflight cache keys this file's checks by (cache.fingerprint: path, size, mtime, edges)."""
        return cache.fingerprint(self.path)

    def __getstate__(self):  # DataLoader workers reopen parquet lazily instead of pickling the table
        state = dict(self.__dict__)
        state.pop("_table", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_offsets" not in state:
            self._table = _open_table(self.path)


class HubFile(RecordFile):
    """A hub dataset's split (`hf:ORG/NAME#SPLIT`), read through `datasets.load_dataset`: its Arrow table as
    stored (images stay {bytes, path} until a record is read, as for local parquet), cached where datasets
    caches (HF_HOME, HF_DATASETS_CACHE); offline (HF_DATASETS_OFFLINE=1) only what that cache holds. Keyed in
    the preflight cache by the dataset's own fingerprint."""

    def __init__(self, name: str, split: str):
        self.name, self.split = name, split
        self.path = f"{HUB_PREFIX}{name}#{split}"
        self._lines = self.path
        self._table, self._fingerprint = self._load()
        self._length = self._table.num_rows

    def _load(self):
        from datasets import load_dataset

        try:
            dataset = load_dataset(self.name, split=self.split)
        except Exception as err:  # datasets raises many types: not found, offline, no such split
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            raise ValueError(f"{self.path}: cannot load the dataset ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:300]})" + ("; offline, it must already be in the "
                                                                         "datasets cache" if offline else "")) from err
        return dataset.data.table, dataset._fingerprint

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.path}:{self._fingerprint}".encode()).hexdigest()[:32]

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._table, _ = self._load()


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
    """A data path -> the files it holds: a file, a save_to_disk folder, a folder of parquet files, or shards
    named by a range (`train-{000..009}.tar`) or a glob."""
    if not os.path.exists(path):
        return expand_pattern(path)
    if os.path.isdir(path) and not is_saved_dataset(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            raise ValueError(f"{path} holds several splits (a DatasetDict); name one, e.g. {path}/train")
        files = sorted(str(p) for p in Path(path).rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: a folder with no parquet files and no save_to_disk dataset")
        return files
    return [path]


class SourceFile:
    """One data file as a source reads it: the rows its selector keeps (None: all), its image root, and a
    LLaMA-Factory entry's renaming; records are named by their row in the file."""

    def __init__(self, file: RecordFile, source: Source, rows: Optional[np.ndarray] = None, caption_prompt: str = ""):
        self.file, self.source, self.rows, self.caption_prompt = file, source, rows, caption_prompt
        self.path = file.path
        self.remap = Remap(**source.columns) if source.columns else None

    @property
    def tag(self) -> str:
        """What besides the file decides its records' reading (a part of the preflight cache key)."""
        if not self.caption_prompt:
            return self.source.tag
        return json.dumps([self.source.tag, self.caption_prompt])

    def fingerprint(self) -> str:
        return self.file.fingerprint()

    def __len__(self) -> int:
        return len(self.file) if self.rows is None else len(self.rows)

    def row(self, index: int) -> int:
        return int(index) if self.rows is None else int(self.rows[index])

    def __getitem__(self, index: int):
        record = self.file[self.row(index)]
        return self.remap(record) if self.remap else record


def line_offsets(path: str, chunk: int = 1 << 24) -> np.ndarray:
    """Byte offsets of the non-blank lines of a file, as int64 (found with numpy, 16 MB at a time)."""
    starts, ends, position = [np.zeros(1, np.int64)], [], 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + position
            ends.append(newlines)
            starts.append(newlines + 1)
            position += len(block)
    starts, ends = np.concatenate(starts), np.concatenate(ends + [np.array([position], np.int64)])
    keep = ends - starts > 0
    short = np.flatnonzero(keep & (ends - starts < 64))
    if len(short):  # whitespace-only lines are not records
        with open(path, "rb") as f:
            for i in short:
                f.seek(int(starts[i]))
                keep[i] = bool(f.read(int(ends[i] - starts[i])).strip())
    return starts[keep]


class RecordIndex:
    """Several data sources seen as one list of records; global index -> (file, local index).

    `spec` is the --train_data grammar of specs.py ('a.jsonl,b.parquet', with sampling weights
    'a.jsonl:0.7,b.parquet:0.3', selectors 'a.jsonl#first:50%', mixture files 'dataset_info.json#name') or a
    list of paths; a source may be a file, a folder of parquet files or a `save_to_disk` folder.
    `repeats`: each source's draws per record and epoch (InternVL's repeat_time; 1 elsewhere).
    """

    def __init__(self, spec, image_root: str = "", data_format: str = "auto", cache_dir: str = "",
                 caption_prompt: str = ""):
        sources = parse_spec(spec) if isinstance(spec, str) else [Source(str(p)) for p in spec]
        self.image_root, self.data_format, self.cache_dir = image_root, data_format, cache_dir
        self.caption_prompt = caption_prompt
        self.files: list[SourceFile] = []
        self.starts, self.source_ranges, self.weights, self.repeats = [], [], [], []
        total = 0
        for source in sources:
            first = total
            try:
                files = ([HubFile(source.path[len(HUB_PREFIX):], source.split)] if source.path.startswith(HUB_PREFIX)
                         else [RecordFile(path, cache_dir) for path in expand_source(source.path)])
            except (OSError, ValueError) as err:
                raise type(err)(f"{err}" + (f" (entry {source.name} of {source.origin})" if source.origin else ""))
            rows = None
            if source.select != "all":
                kept = select_rows(sum(len(f) for f in files), source.select, source.path)
                rows, offset = [], 0
                for f in files:
                    rows.append(kept[(kept >= offset) & (kept < offset + len(f))] - offset)
                    offset += len(f)
            for number, f in enumerate(files):
                self.files.append(SourceFile(f, source, rows[number] if rows is not None else None, caption_prompt))
                self.starts.append(total)
                total += len(self.files[-1])
            self.source_ranges.append((first, total))
            self.weights.append(source.weight)
            self.repeats.append(source.repeat)
        self.total = total

    def source_sizes(self, kept) -> list[int]:
        """How many of the kept global indices (sorted) fall in each source."""
        kept = np.asarray(kept)
        return [int(np.searchsorted(kept, end) - np.searchsorted(kept, start)) for start, end in self.source_ranges]

    def __len__(self) -> int:
        return self.total

    def locate(self, index: int) -> tuple[SourceFile, int]:
        file_no = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.files[file_no], int(index) - self.starts[file_no]

    def sample(self, index: int) -> Sample:
        f, local = self.locate(index)
        row = f.row(local)
        try:
            record = f[local]
            return to_sample(record, f.path, row, f.source.image_root or self.image_root, self.data_format,
                             placement=f.source.placement, caption_prompt=self.caption_prompt)
        except DataError:
            raise
        except Exception as err:  # a layout reader meeting a shape it did not expect: still a named bad record
            raise DataError("bad_record", f.path, row, f"{type(err).__name__} while reading it: "
                                                         f"{' '.join(str(err).split())[:300]}") from err
