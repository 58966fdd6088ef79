"""Data sources -> records: files and folders, random access to each record, several sources as one index.

A record is one row of a JSONL/JSON/parquet file or of a `save_to_disk` folder; `RecordIndex.sample`
turns one into a Sample through the readers of `formats.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .formats import DataError, Sample, to_sample


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


class RecordIndex:
    """Several data sources seen as one list of records; global index -> (file, local index).

    `spec` is 'a.jsonl,b.parquet' or, with sampling weights, 'a.jsonl:0.7,b.parquet:0.3'; a
    source may be a file, a folder of parquet files or a `save_to_disk` folder.
    """

    def __init__(self, spec, image_root: str = "", data_format: str = "auto"):
        sources = parse_sources(spec) if isinstance(spec, str) else [(str(p), None) for p in spec]
        self.image_root, self.data_format = image_root, data_format
        self.files, self.starts, self.source_ranges, self.weights = [], [], [], []
        total = 0
        for path, weight in sources:
            first = total
            for file_path in expand_source(path):
                self.files.append(RecordFile(file_path))
                self.starts.append(total)
                total += len(self.files[-1])
            self.source_ranges.append((first, total))
            self.weights.append(weight)
        self.total = total

    def source_sizes(self, kept: list[int]) -> list[int]:
        """How many of the kept global indices fall in each source."""
        return [sum(start <= i < end for i in kept) for start, end in self.source_ranges]

    def __len__(self) -> int:
        return self.total

    def locate(self, index: int) -> tuple[RecordFile, int]:
        file_no = max(i for i, start in enumerate(self.starts) if start <= index)
        return self.files[file_no], index - self.starts[file_no]

    def sample(self, index: int) -> Sample:
        f, local = self.locate(index)
        return to_sample(f[local], f.path, local, self.image_root, self.data_format)
