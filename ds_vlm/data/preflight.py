"""Run records through the real readers, image decoder and processor before training, once per data file.

`preflight` checks what the data cache (cache.py) does not hold yet, every rank a share, and keeps each data
file's results there as columns (`Checks`): a later start, a resume or `validate` with the same file, model
processor and encoding flags reads them instead of encoding again. --preflight picks how much is checked:

    cached   (default) results from the cache where valid, the rest checked (and cached)
    full     every record checked again (and cached)
    sample:N N random records per file without a cache entry checked, the rest estimated from them
    off      nothing checked: records found bad while training are skipped and counted (--max_bad)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset

import ds_vlm.data.cache as cache
from ds_vlm.config import PREFLIGHT
from ds_vlm.data.encode import Encoder, count_targets
from ds_vlm.data.formats import DataError
from ds_vlm.data.sources import RecordIndex

KINDS = ("ok", *DataError.KINDS, "unchecked")  # a kind's code is its position here
OK, UNCHECKED = 0, len(KINDS) - 1


@dataclass
class RecordCheck:
    index: int                   # global index over all data files
    kind: str = "ok"             # "ok" or a DataError kind
    message: str = ""
    n_tokens: int = 0
    n_image_tokens: int = 0
    n_video_tokens: int = 0
    n_targets: int = 0
    ignored: tuple[str, ...] = ()  # keys of the record nothing read (they are reported, with a count)
    notes: tuple[str, ...] = ()    # what reading changed (Sample.notes), reported with a count
    where: str = ""                # "FILE record I": the first records with each note are named


class BadDataError(RuntimeError):
    """Preflight found bad records and --bad_records is error."""


class TooManyBadRecords(RuntimeError):
    """More than --max_bad records met in training (--preflight off or sample:N) were bad."""


class BadRecordCount:
    """Records left out in training for being bad (--preflight off or sample:N), over all ranks: each batch
    of them is an event in metrics.jsonl; more than --max_bad stop the run."""

    def __init__(self, limit: int, log):
        self.limit, self.log, self.total = limit, log, 0

    def add(self, step: int, new: int) -> None:
        self.total += new
        self.log.event({"event": "bad_records", "step": step, "new": new, "total": self.total})

    def over_limit(self) -> Optional[TooManyBadRecords]:
        if self.total <= self.limit:
            return None
        return TooManyBadRecords(
            f"{self.total} records met in training were bad, more than --max_bad {self.limit}; stopping. Each is "
            f"named in the ranks' output; check the data with `python -m ds_vlm.validate` or train with "
            f"--preflight cached.")


class _CheckDataset(Dataset):
    def __init__(self, records: RecordIndex, encoder: Encoder, indices: list[int]):
        self.records, self.encoder, self.indices = records, encoder, indices
        self.image_token_id = encoder.image_token_id
        self.video_token_id = encoder.video_token_id

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int) -> RecordCheck:
        index = self.indices[i]
        try:
            sample, encoded = self.encoder.encode_record(self.records, index)  # the training dataset's own path
        except DataError as err:
            return RecordCheck(index, err.kind, str(err))
        ids = encoded["input_ids"][0]
        return RecordCheck(index, n_tokens=int(ids.numel()), n_image_tokens=int((ids == self.image_token_id).sum()),
                           n_video_tokens=int((ids == self.video_token_id).sum()) if self.video_token_id else 0,
                           n_targets=count_targets(encoded["labels"]), ignored=sample.ignored,
                           notes=tuple(sorted(set(sample.notes))), where=f"{sample.source} record {sample.index}")


def _loader(records: RecordIndex, encoder: Encoder, indices, num_workers: int) -> DataLoader:
    from ds_vlm.runtime.faults import ignore_stop_signals

    return DataLoader(_CheckDataset(records, encoder, indices), batch_size=None, num_workers=num_workers,
                      collate_fn=lambda x: x, worker_init_fn=ignore_stop_signals if num_workers else None)


NAMED_PER_NOTE = 3  # records named for each note


def add_noted(noted: dict, notes, where: str) -> None:
    """Name `where` under each of `notes` in `noted` (note -> the first NAMED_PER_NOTE records with it)."""
    for note in notes:
        named = noted.setdefault(note, [])
        if len(named) < NAMED_PER_NOTE and where not in named:
            named.append(where)


class Checks:
    """Preflight's results for a set of records, as columns: global index, kind code (see KINDS), token,
    image-token, video-token and target counts; the bad records' messages, the ignored keys' and the notes'
    counts, and the first records with each note (`noted`)."""

    COLUMNS = ("kind", "n_tokens", "n_image_tokens", "n_video_tokens", "n_targets")

    def __init__(self, index, kind=None, n_tokens=None, n_image_tokens=None, n_video_tokens=None, n_targets=None,
                 messages: Optional[dict] = None, ignored: Optional[Counter] = None,
                 notes: Optional[Counter] = None, noted: Optional[dict] = None):
        self.index = np.asarray(index, dtype=np.int64)
        n = len(self.index)
        self.kind = np.zeros(n, np.uint8) if kind is None else np.asarray(kind, np.uint8)
        for name, values in zip(self.COLUMNS[1:], (n_tokens, n_image_tokens, n_video_tokens, n_targets)):
            setattr(self, name, np.zeros(n, np.int32) if values is None else np.asarray(values, np.int32))
        self.messages = dict(messages or {})  # global index -> message, bad records only
        self.ignored = Counter(ignored or {})
        self.notes = Counter(notes or {})
        self.noted = {note: list(named) for note, named in (noted or {}).items()}

    @classmethod
    def of(cls, checks: list[RecordCheck]) -> "Checks":
        noted: dict = {}
        for c in checks:
            add_noted(noted, c.notes, c.where)
        return cls([c.index for c in checks], [KINDS.index(c.kind) for c in checks],
                   *([getattr(c, name) for c in checks] for name in cls.COLUMNS[1:]),
                   messages={c.index: c.message for c in checks if c.kind != "ok"},
                   ignored=Counter(key for c in checks for key in c.ignored),
                   notes=Counter(note for c in checks for note in c.notes), noted=noted)

    @classmethod
    def unchecked(cls, start: int, count: int) -> "Checks":
        return cls(np.arange(start, start + count), np.full(count, UNCHECKED, np.uint8))

    @classmethod
    def concat(cls, parts: list["Checks"]) -> "Checks":
        index = np.concatenate([p.index for p in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(index, kind="stable")
        columns = [np.concatenate([getattr(p, name) for p in parts])[order] if parts else None
                   for name in cls.COLUMNS]
        noted: dict = {}
        for p in parts:
            for note, named in p.noted.items():
                for where in named:
                    add_noted(noted, [note], where)
        return cls(index[order], *columns, messages={k: v for p in parts for k, v in p.messages.items()},
                   ignored=sum((p.ignored for p in parts), Counter()), notes=sum((p.notes for p in parts), Counter()),
                   noted=noted)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position):
        """The check of the record at `position` (in index order; a slice: a list of them), as one object (its
        ignored keys are only counted over all records: `ignored`)."""
        if isinstance(position, slice):
            return [self[i] for i in range(len(self))[position]]
        index = int(self.index[position])
        return RecordCheck(index, KINDS[self.kind[position]], self.messages.get(index, ""),
                           *(int(getattr(self, name)[position]) for name in self.COLUMNS[1:]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, mask: np.ndarray) -> "Checks":
        index = self.index[mask]
        kept = set(index[np.isin(index, list(self.messages))].tolist()) if self.messages else set()
        return Checks(index, *(getattr(self, name)[mask] for name in self.COLUMNS),
                      messages={i: m for i, m in self.messages.items() if i in kept}, ignored=self.ignored,
                      notes=self.notes, noted=self.noted)

    def shifted(self, offset: int) -> "Checks":
        return Checks(self.index + offset, *(getattr(self, name) for name in self.COLUMNS),
                      messages={i + offset: m for i, m in self.messages.items()}, ignored=self.ignored,
                      notes=self.notes, noted=self.noted)

    def counts(self) -> Counter:
        return Counter({KINDS[code]: int(n) for code, n in enumerate(np.bincount(self.kind, minlength=len(KINDS)))
                        if n})

    @property
    def bad(self) -> np.ndarray:
        return (self.kind != OK) & (self.kind != UNCHECKED)

    def save(self, path: Path) -> None:
        """An atomic write (a temporary file renamed) of the columns, messages and ignored-key counts."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.temporary_name(path)
        meta = json.dumps({"messages": {str(k): v for k, v in self.messages.items()}, "ignored": self.ignored,
                           "notes": self.notes, "noted": self.noted})
        with open(tmp, "wb") as f:
            np.savez(f, index=self.index, meta=np.array(meta), **{name: getattr(self, name) for name in self.COLUMNS})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Checks":
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return cls(data["index"], *(data[name] for name in cls.COLUMNS),
                       messages={int(k): v for k, v in meta["messages"].items()}, ignored=Counter(meta["ignored"]),
                       notes=Counter(meta.get("notes", {})), noted=meta.get("noted", {}))


def check_columns(records: RecordIndex, encoder: Encoder, indices: np.ndarray, num_workers: int = 0,
                  progress: bool = False) -> Checks:
    """One check per record of `indices` (global indices), in their order, straight into columns (no object
    per record kept); decoding and encoding run in `num_workers` workers; a progress bar with an ETA when
    `progress`."""
    from tqdm import tqdm

    out = Checks(indices)
    shown = progress and len(indices) >= 2000
    if shown and not sys.stderr.isatty():  # a log file gets one line, not a bar redrawn into it
        print(f"preflight: checking {len(indices)} records (~{len(indices) / 400:.0f} s at ~400 records/s a core)",
              file=sys.stderr, flush=True)
    bar = tqdm(total=len(indices), desc="preflight", unit="rec", mininterval=2.0,
               disable=not shown or not sys.stderr.isatty())
    for i, check in enumerate(_loader(records, encoder, out.index.tolist(), num_workers)):
        out.kind[i] = KINDS.index(check.kind)
        for name in Checks.COLUMNS[1:]:
            getattr(out, name)[i] = getattr(check, name)
        if check.kind != "ok":
            out.messages[check.index] = check.message
        out.ignored.update(check.ignored)
        out.notes.update(check.notes)
        add_noted(out.noted, check.notes, check.where)
        bar.update()
    bar.close()
    return out


def preflight(records: RecordIndex, encoder: Encoder, mode: str = "cached", cache_dir: str = "",
              num_workers: int = 0, progress: bool = False) -> tuple[Checks, str]:
    """Every record's Checks (in index order, on every rank) and a line saying where they came from. The
    ranks check their shares of what the cache lacks; the node's first rank writes the new cache entries."""
    import ds_vlm.runtime.distributed as comm

    chosen = PREFLIGHT.fullmatch(mode)
    assert chosen, mode
    distributed = comm.is_distributed()
    rank, world = comm.rank(), comm.world_size()
    root = cache.writable(cache.cache_root(cache_dir)) if mode != "off" else None
    key = cache.encoding_key(encoder, records.data_format, records.image_root) if root else ""
    entries = [root / "preflight" / f"{f.fingerprint()}-{key}{cache.tag_suffix(f.tag)}.npz" if root else None
               for f in records.files]
    reuse = mode == "cached" or mode.startswith("sample")
    hits = [bool(reuse and entry is not None and entry.exists()) for entry in entries]
    if distributed:  # rank 0 decides, so that every rank checks the same records even as entries appear
        hits = comm.broadcast_object(hits, src=0)
    parts, todo, whole = [], [], []
    sample = int(chosen[1]) if chosen[1] else 0
    rng = np.random.default_rng(0)
    for file_no, (f, entry) in enumerate(zip(records.files, entries)):
        start = records.starts[file_no]
        if hits[file_no]:
            parts.append(Checks.load(entry).shifted(start))
        elif mode == "off":
            parts.append(Checks.unchecked(start, len(f)))
        elif sample and sample < len(f):
            chosen = np.sort(rng.choice(len(f), sample, replace=False))
            todo.append(chosen + start)
            unchosen = np.setdiff1d(np.arange(len(f)), chosen)
            parts.append(Checks(unchosen + start, np.full(len(unchosen), UNCHECKED, np.uint8)))
        else:
            todo.append(np.arange(start, start + len(f)))
            whole.append(file_no)
    todo = np.concatenate(todo) if todo else np.zeros(0, np.int64)
    began = time.perf_counter()
    checked = check_columns(records, encoder, todo[rank::world], num_workers, progress)
    if distributed and len(todo):
        checked = Checks.concat(comm.all_gather_object(checked))
    elapsed = time.perf_counter() - began
    if root is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # files checked whole: cached
        for file_no in whole:
            start, f = records.starts[file_no], records.files[file_no]
            mask = (checked.index >= start) & (checked.index < start + len(f))
            checked.select(mask).shifted(-start).save(entries[file_no])
    result = Checks.concat(parts + [checked])
    from_cache = sum(len(records.files[i]) for i, hit in enumerate(hits) if hit)
    said = [f"{len(result)} records"]
    if from_cache:
        said.append(f"{from_cache} from the cache ({root})")
    if len(todo):
        said.append(f"{len(todo)} checked in {elapsed:.1f} s ({len(todo) / max(elapsed, 1e-9):.0f}/s)")
    if sample and len(todo):
        said.append(estimate(checked, len(result) - from_cache))
    if mode == "off":
        said.append("none checked (--preflight off: bad records met in training are skipped and counted)")
    return result, ", ".join(said)


def estimate(sampled: Checks, population: int) -> str:
    """What a sample says about the records it was drawn from."""
    n, bad = len(sampled), int(sampled.bad.sum())
    ok = sampled.kind == OK
    share = bad / max(n, 1)
    mean = float(sampled.n_tokens[ok].mean()) if ok.any() else 0.0
    return (f"sample of {n} of {population}: {bad} bad ({share:.1%}), estimate ~{round(share * population)} bad "
            f"records, mean length {mean:.0f} tokens (~{mean * population * (1 - share) / 1e6:.1f} M tokens)")


def summarize(checks, show: int = 5) -> str:
    """Counts by kind and the first offenders, one line each."""
    checks = Checks.of(checks) if isinstance(checks, list) else checks
    counts = checks.counts()
    lines = ["records: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: kv[0] != "ok"))]
    bad = sorted(checks.messages)
    lines += [f"  {checks.messages[i]}" for i in bad[:show]]
    if len(bad) > show:
        lines.append(f"  ... and {len(bad) - show} more")
    lines += [f"ignored key `{key}` in {n} record{'s' * (n != 1)} (not read by any layout; check it is not data)"
              for key, n in sorted(checks.ignored.items())]
    for note, n in sorted(checks.notes.items()):
        named = checks.noted.get(note, [])
        lines.append(f"note: {note} in {n} record{'s' * (n != 1)}"
                     + (f" ({', '.join(named)}{', ...' if n > len(named) else ''})" if named else ""))
    return "\n".join(lines)


def usable(checks: Checks, bad_records: str, truncation: str, what: str) -> Checks:
    """The good (and unchecked) records' checks; bad records stop the run unless the flags say to drop them."""
    bad = checks.bad
    kinds = set(KINDS[code] for code in np.unique(checks.kind[bad]))
    dropped_by_choice = bad_records == "skip" or (truncation == "skip" and kinds == {"too_long"})
    if bad.any() and not dropped_by_choice:
        raise BadDataError(f"{int(bad.sum())} bad record(s) in {what}; fix them or pass --bad_records skip.\n"
                           + summarize(checks, show=10))
    good = checks.select(~bad)
    if not len(good):
        raise BadDataError(f"no usable record in {what}")
    return good
