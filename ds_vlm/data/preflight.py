"""Run records through the real readers, image decoder and processor before training."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from torch.utils.data import DataLoader, Dataset

from .encode import Encoder
from .formats import DataError
from .sources import RecordIndex


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


class BadDataError(RuntimeError):
    """Preflight found bad records and --bad_records is error."""


class _CheckDataset(Dataset):
    def __init__(self, records: RecordIndex, encoder: Encoder, indices: list[int]):
        self.records, self.encoder, self.indices = records, encoder, indices
        self.image_token_id = encoder.tokenizer.convert_tokens_to_ids(encoder.image_token)
        self.video_token_id = (encoder.tokenizer.convert_tokens_to_ids(encoder.video_token) if encoder.video_token
                               else None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int) -> RecordCheck:
        index = self.indices[i]
        try:
            sample = self.records.sample(index)
            encoded = self.encoder.encode(sample, *self.encoder.media(sample))
        except DataError as err:
            return RecordCheck(index, err.kind, str(err))
        ids, labels = encoded["input_ids"][0], encoded["labels"][0]
        return RecordCheck(index, n_tokens=int(ids.numel()), n_image_tokens=int((ids == self.image_token_id).sum()),
                           n_video_tokens=int((ids == self.video_token_id).sum()) if self.video_token_id else 0,
                           n_targets=int((labels[1:] != -100).sum()), ignored=sample.ignored)


def check_records(records: RecordIndex, encoder: Encoder, indices: Optional[list[int]] = None,
                  num_workers: int = 0) -> list[RecordCheck]:
    """One RecordCheck per record, in index order; decoding and encoding run in workers."""
    indices = list(range(len(records))) if indices is None else indices
    from ..faults import ignore_stop_signals

    loader = DataLoader(_CheckDataset(records, encoder, indices), batch_size=None, num_workers=num_workers,
                        collate_fn=lambda x: x, worker_init_fn=ignore_stop_signals if num_workers else None)
    return list(loader)


def summarize(checks: list[RecordCheck], show: int = 5) -> str:
    """Counts by kind and the first offenders, one line each."""
    counts = Counter(c.kind for c in checks)
    lines = ["records: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: kv[0] != "ok"))]
    bad = [c for c in checks if c.kind != "ok"]
    lines += [f"  {c.message}" for c in bad[:show]]
    if len(bad) > show:
        lines.append(f"  ... and {len(bad) - show} more")
    ignored = Counter(key for c in checks for key in c.ignored)
    lines += [f"ignored key `{key}` in {n} record{'s' * (n != 1)} (not read by any layout; check it is not data)"
              for key, n in sorted(ignored.items())]
    return "\n".join(lines)


def preflight(records: RecordIndex, encoder: Encoder, num_workers: int) -> list[RecordCheck]:
    """Every rank checks its share of the records; every rank gets all the checks, in index order."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = check_records(records, encoder, list(range(rank, len(records), world)), num_workers)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    return sorted((c for part in gathered for c in part), key=lambda c: c.index)


def usable(checks: list[RecordCheck], bad_records: str, truncation: str, what: str) -> list[RecordCheck]:
    """The good records' checks; bad records stop the run unless the flags say to drop them."""
    bad = [c for c in checks if c.kind != "ok"]
    dropped_by_choice = bad_records == "skip" or (truncation == "skip" and all(c.kind == "too_long" for c in bad))
    if bad and not dropped_by_choice:
        raise BadDataError(f"{len(bad)} bad record(s) in {what}; fix them or pass --bad_records skip.\n"
                           + summarize(checks, show=10))
    good = [c for c in checks if c.kind == "ok"]
    if not good:
        raise BadDataError(f"no usable record in {what}")
    return good
