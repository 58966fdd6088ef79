"""Datasets, the deterministic global-batch plan, and collation into padded batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import Dataset

from .encode import IGNORE_INDEX, TOKEN_KEYS, Encoder, merge_parts
from .formats import RecordFile, Sample, to_sample
from .images import load_images


class RecordIndex:
    """Several data files seen as one list of records; global index -> (file, local index)."""

    def __init__(self, paths: list[str], image_root: str = ""):
        self.files = [RecordFile(p) for p in paths]
        self.image_root = image_root
        self.starts = []
        total = 0
        for f in self.files:
            self.starts.append(total)
            total += len(f)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def locate(self, index: int) -> tuple[RecordFile, int]:
        file_no = max(i for i, start in enumerate(self.starts) if start <= index)
        return self.files[file_no], index - self.starts[file_no]

    def sample(self, index: int) -> Sample:
        f, local = self.locate(index)
        return to_sample(f[local], f.path, local, self.image_root)


class SFTDataset(Dataset):
    """Encoded samples for the records listed in `indices` (the ones preflight kept)."""

    def __init__(self, records: RecordIndex, encoder: Encoder, indices: Optional[list[int]] = None):
        self.records, self.encoder = records, encoder
        self.indices = list(range(len(records))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.records.sample(self.indices[i])
        return self.encoder.encode(sample, load_images(sample))


@dataclass
class BatchPlan:
    """Which dataset positions each rank sees in each micro-step of each optimizer step.

    Epoch e is a permutation of all samples seeded by (seed, e). Optimizer step s of the
    epoch takes the next `global_batch` positions; sample j of that global batch goes to
    slot j mod (world * grad_accum), slot k being (accumulation step k // world, rank
    k % world). The last step of an epoch is smaller: nothing is dropped or repeated, and
    a rank whose micro-batch comes up empty runs a fully masked dummy (it adds 0 to the
    loss and keeps the collectives in step). The set of samples in a global step does not
    depend on the world size, which is what lets a run resume on another one.
    """

    n_samples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_samples / self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n_samples, generator=generator).tolist()

    def step_samples(self, step: int, order: Optional[list[int]] = None) -> list[int]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = order if order is not None else self.epoch_order(epoch)
        return order[offset * self.global_batch:(offset + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int, order: Optional[list[int]] = None) -> list[list[int]]:
        chosen = self.step_samples(step, order)
        slots = self.world_size * self.grad_accum
        return [chosen[a * self.world_size + rank::slots] for a in range(self.grad_accum)]

    def iterate(self, rank: int, start_step: int, total_steps: int) -> Iterator[list[int]]:
        """Micro-batches (lists of dataset positions) for this rank, from start_step on."""
        cached_epoch, order = -1, None
        for step in range(start_step, total_steps):
            epoch = step // self.steps_per_epoch
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.epoch_order(epoch)
            yield from self.micro_batches(step, rank, order)


class Collator:
    """Pads samples into one batch; a batch with no image gets the dummy image appended."""

    def __init__(self, pad_token_id: int, dummy: dict[str, torch.Tensor]):
        self.pad_token_id = pad_token_id
        self.dummy = dummy

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
        """(batch, meta); meta counts only real samples: samples, tokens, targets."""
        meta = {"samples": len(samples), "tokens": sum(int(s["input_ids"].shape[1]) for s in samples),
                "targets": sum(count_targets(s["labels"]) for s in samples)}
        samples = list(samples)
        if not any("pixel_values" in s for s in samples):
            samples = [merge_parts([samples[0], self.dummy])] + samples[1:] if samples else [dict(self.dummy)]
        length = max(s["input_ids"].shape[1] for s in samples)
        batch: dict[str, list[torch.Tensor]] = {}
        for s in samples:
            for key, value in s.items():
                if key in TOKEN_KEYS:
                    value = torch.nn.functional.pad(value, (0, length - value.shape[1]), value=self._pad_value(key))
                batch.setdefault(key, []).append(value)
        return {key: torch.cat(values, dim=0) for key, values in batch.items()}, meta

    def _pad_value(self, key: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that enter the loss: next-token targets, so the first position never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
