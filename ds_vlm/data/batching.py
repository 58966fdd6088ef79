"""Datasets, the deterministic global-batch plan, collation into padded or packed batches, and the loader."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .encode import IGNORE_INDEX, TOKEN_KEYS, Encoder, merge_parts
from .formats import DataError
from .sources import RecordIndex

if TYPE_CHECKING:
    from ..config import TrainConfig


class SFTDataset(Dataset):
    """Encoded samples for the records listed in `indices` (the ones preflight kept; a numpy array, so that
    forked workers share it). With `skip_bad` (records preflight did not check), a bad record comes out as
    {"bad": its message}, which the collator leaves out and counts."""

    def __init__(self, records: RecordIndex, encoder: Encoder, indices=None, skip_bad: bool = False, checks=None):
        self.records, self.encoder, self.skip_bad = records, encoder, skip_bad
        self.checks = checks  # preflight's Checks of these records, when the trainer made it
        self.indices = np.arange(len(records)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        try:
            sample = self.records.sample(int(self.indices[i]))
            return self.encoder.encode(sample, *self.encoder.media(sample))
        except DataError as err:
            if not self.skip_bad:
                raise
            return {"bad": str(err)}


def epoch_order(n_samples: int, seed: int, epoch: int, source_sizes: Optional[list[int]] = None,
                weights: Optional[list[float]] = None) -> list[int]:
    """Dataset positions of one epoch, seeded by (seed, epoch).

    Without weights: a permutation of all samples. With weights (sources laid out one after
    the other in position space), source i contributes round(w_i / sum(w) * n_samples)
    draws: its own permutation, repeated when it must be upsampled, cut when downsampled.
    """
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    if not weights or weights[0] is None:
        return torch.randperm(n_samples, generator=generator).tolist()
    draws, offset, total_weight = [], 0, sum(weights)
    for size, weight in zip(source_sizes, weights):
        wanted = round(weight / total_weight * n_samples)
        if size:
            rounds = [torch.randperm(size, generator=generator) + offset for _ in range(math.ceil(wanted / size))]
            draws.extend(torch.cat(rounds)[:wanted].tolist() if rounds else [])
        offset += size
    return [draws[i] for i in torch.randperm(len(draws), generator=generator).tolist()]


@dataclass
class BatchPlan:
    """Which dataset positions each rank sees in each micro-step of each optimizer step.

    Epoch e is `epoch_order(e)`. Optimizer step s of the epoch takes the next
    `global_batch` positions; sample j of that global batch goes to slot j mod
    (world * grad_accum), slot k being (accumulation step k // world, rank k % world). The
    last step of an epoch is smaller: nothing is dropped or repeated, and a rank whose
    micro-batch comes up empty runs a fully masked dummy (it adds 0 to the loss and keeps
    the collectives in step). The set of samples in a global step does not depend on the
    world size, which is what lets a run resume on another one.
    """

    n_samples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    source_sizes: Optional[list[int]] = None
    weights: Optional[list[float]] = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @cached_property
    def epoch_length(self) -> int:
        return len(self.epoch_order(0)) if self.weights and self.weights[0] is not None else self.n_samples

    @cached_property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_length / self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        return epoch_order(self.n_samples, self.seed, epoch, self.source_sizes, self.weights)

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """The epoch as a list of micro-batches in slot order (step, accumulation step, rank)."""
        order, slots = self.epoch_order(epoch), self.world_size * self.grad_accum
        out = []
        for offset in range(0, self.steps_per_epoch * self.global_batch, self.global_batch):
            chosen = order[offset:offset + self.global_batch]
            out.extend(chosen[k::slots] for k in range(slots))
        return out

    def step_samples(self, step: int) -> list[int]:
        """Every dataset position of `step`, all ranks and accumulation steps."""
        return [i for mb in self.micro_batches(step, None) for i in mb]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of a global step."""
        return divmod(step, self.steps_per_epoch)

    def steps_in(self, epochs: int) -> int:
        """Optimizer steps in the first `epochs` epochs."""
        return epochs * self.steps_per_epoch

    def micro_batches(self, step: int, rank: Optional[int], epoch_cache: Optional[dict] = None) -> list[list[int]]:
        """This rank's micro-batches of `step` (all ranks' if rank is None)."""
        epoch, offset = self.locate(step)
        cache = {} if epoch_cache is None else epoch_cache
        if epoch not in cache:
            cache.clear()
            cache[epoch] = self.epoch_micro_batches(epoch)
        slots = self.world_size * self.grad_accum
        mine = cache[epoch][offset * slots:(offset + 1) * slots]
        mine += [[] for _ in range(slots - len(mine))]
        return mine if rank is None else [mine[a * self.world_size + rank] for a in range(self.grad_accum)]

    def iterate(self, rank: int, start_step: int, total_steps: int) -> Iterator[list[int]]:
        """Micro-batches (lists of dataset positions) for this rank, from start_step on."""
        cache: dict = {}
        for step in range(start_step, total_steps):
            yield from self.micro_batches(step, rank, cache)


@dataclass
class TokenBudgetPlan(BatchPlan):
    """Micro-batches formed by a token budget instead of a fixed size.

    Each epoch's order is cut into windows of 64 x world x grad_accum samples; each window
    is sorted by length and packed greedily so that the tokens the forward computes over
    (longest sample x count; with `packing`, the sum of the lengths) stay within `max_tokens`;
    the micro-batches are then shuffled (seeded) and dealt to the slots of
    successive optimizer steps. Every sample of the epoch is used once; the last step may
    leave slots empty (masked dummies). Samples per step vary; the loss stays a token-level
    mean over the global batch.
    """

    lengths: Optional[list[int]] = None
    max_tokens: int = 0
    window: int = 64
    packing: bool = False  # a packed micro-batch costs the sum of its lengths, a padded one longest x count
    _epoch_steps: dict = field(default_factory=dict, init=False, repr=False)  # epoch -> its steps, once packed

    @cached_property
    def steps_per_epoch(self) -> int:
        """The first epoch's steps; later epochs pack their own order and may differ by a step or two."""
        return self.epoch_steps(0)

    def epoch_steps(self, epoch: int) -> int:
        if epoch not in self._epoch_steps:
            self._epoch_steps[epoch] = math.ceil(len(self.epoch_micro_batches(epoch)) /
                                                 (self.world_size * self.grad_accum))
        return self._epoch_steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        epoch = 0
        while step >= self.epoch_steps(epoch):  # epochs differ in length: walk them (each packed once)
            step -= self.epoch_steps(epoch)
            epoch += 1
        return epoch, step

    def steps_in(self, epochs: int) -> int:
        return sum(self.epoch_steps(e) for e in range(epochs))

    def _cost(self, current: list[int], candidate: int) -> int:
        """Tokens the forward computes over if `candidate` joins the micro-batch `current`."""
        if self.packing:
            return sum(self.lengths[i] for i in current) + self.lengths[candidate]
        return max(self.lengths[candidate], *(self.lengths[i] for i in current)) * (len(current) + 1)

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        key = ("packed", epoch)
        if getattr(self, "_cached_key", None) == key:
            return self._cached
        order, span = self.epoch_order(epoch), self.window * self.world_size * self.grad_accum
        packed: list[list[int]] = []
        for start in range(0, len(order), span):
            current = []
            for i in sorted(order[start:start + span], key=lambda i: self.lengths[i]):
                if current and self._cost(current, i) > self.max_tokens:
                    packed.append(current)
                    current = []
                current.append(i)
            if current:
                packed.append(current)
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch + 7)
        self._cached_key, self._cached = key, [packed[i] for i in torch.randperm(len(packed), generator=generator)]
        return self._cached


class Collator:
    """Samples -> one micro-batch, padded to its longest sample (one row each) or, with `packing`, packed into
    one row: samples concatenated, each with its own positions (which restart at every sample: that is how
    attention is kept inside it) and the sample boundaries as `cu_seq_lens` for varlen kernels. `positions`:
    the adapter's per-sample position ids (needed for packing; for a padded batch they save the model from
    computing them on the device: Qwen's rope index reads token types back to the host per row). A micro-batch
    with no image gets the dummy image (padded: appended to the first sample; packed: as its own sample), all
    of its labels ignored."""

    def __init__(self, pad_token_id: int, dummy: dict[str, torch.Tensor], positions=None, multiple_of: int = 1,
                 dummy_video: Optional[dict[str, torch.Tensor]] = None, packing: bool = False):
        if packing and positions is None:
            raise ValueError("packing needs the adapter's position ids")
        self.pad_token_id = pad_token_id
        self.dummy = dummy
        self.dummy_video = dummy_video  # set when the data holds videos: every micro-batch then has one
        self.positions = positions
        self.packing = packing
        self.multiple_of = multiple_of  # --sequence_parallel: every row's length divides by it

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
        """(batch, meta); meta counts only real samples: samples, tokens, targets; and what the forward
        computes over: computed (padding and dummy included), sample_lengths (each attended span: a padded
        row's unpadded length, a packed row's segments); `bad`: the messages of records left out."""
        bad = [s["bad"] for s in samples if "bad" in s]
        samples = [s for s in samples if "bad" not in s]
        meta = {"bad": bad, "samples": len(samples), "tokens": sum(int(s["input_ids"].shape[1]) for s in samples),
                "targets": sum(count_targets(s["labels"]) for s in samples)}
        if self.packing:
            return self._pack(list(samples), meta)
        samples = list(samples)
        for dummy in self._dummies(samples):
            samples = [merge_parts([samples[0], dummy])] + samples[1:] if samples else [dict(dummy)]
        length = _round_up(max(s["input_ids"].shape[1] for s in samples), self.multiple_of)
        batch: dict[str, list[torch.Tensor]] = {}
        for s in samples:
            if self.positions is not None:
                s = dict(s, position_ids=self.positions(s))
            for key, value in s.items():
                if key in TOKEN_KEYS or key == "position_ids":
                    value = torch.nn.functional.pad(value, (0, length - value.shape[-1]), value=self._pad_value(key))
                batch.setdefault(key, []).append(value)
        meta.update(computed=length * len(samples), sample_lengths=[int(s["input_ids"].shape[1]) for s in samples])
        return {key: torch.cat(values, dim=-2 if key == "position_ids" else 0) for key, values in batch.items()}, meta

    def _dummies(self, samples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """What the micro-batch needs so that the vision tower runs on an image (and a video) on every rank."""
        needed = [] if any("pixel_values" in s for s in samples) else [self.dummy]
        if self.dummy_video is not None and not any("pixel_values_videos" in s for s in samples):
            needed.append(self.dummy_video)
        return needed

    def _pack(self, samples: list[dict[str, torch.Tensor]], meta: dict) -> tuple[dict[str, torch.Tensor], dict]:
        samples += self._dummies(samples)
        total = sum(int(s["input_ids"].shape[1]) for s in samples)
        padding = _round_up(total, self.multiple_of) - total
        if padding:  # a segment of its own at the end: nothing attends to it, it has no label
            samples.append(self._padding(samples[0], padding))
        parts, positions = [], []
        for sample in samples:
            part = {k: v for k, v in sample.items() if k != "attention_mask"}  # no mask: attention is per sample
            part["labels"] = part["labels"].clone()
            part["labels"][:, 0] = IGNORE_INDEX  # the previous sample's last token never predicts this one
            parts.append(part)
            positions.append(self.positions(sample))
        lengths = [int(s["input_ids"].shape[1]) for s in samples]
        batch = merge_parts(parts)
        batch["position_ids"] = torch.cat(positions, dim=-1)
        batch["cu_seq_lens"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        meta.update(computed=sum(lengths), max_length=max(lengths), sample_lengths=lengths)
        return batch, meta

    def _pad_value(self, key: str) -> int:
        return {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)

    def _padding(self, like: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """A text-only segment of `length` pad tokens, with the per-token keys of `like`."""
        return {key: torch.full((1, length), self._pad_value(key), dtype=value.dtype)
                for key, value in like.items() if key in TOKEN_KEYS}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that enter the loss: next-token targets, so the first position never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def make_plan(config: TrainConfig, world: int, records: RecordIndex, kept) -> BatchPlan:
    """Fixed-size micro-batches, or token-budget ones with --max_tokens_per_batch (`kept`: preflight's Checks
    of the usable records)."""
    common = dict(n_samples=len(kept), micro_batch_size=config.micro_batch_size, grad_accum=config.grad_accum,
                  world_size=world, seed=config.seed, source_sizes=records.source_sizes(kept.index),
                  weights=records.weights)
    if config.max_tokens_per_batch:
        return TokenBudgetPlan(**common, lengths=kept.n_tokens.tolist(), max_tokens=config.max_tokens_per_batch,
                               packing=config.packing)
    return BatchPlan(**common)


def _worker_init(_):
    from ..faults import ignore_stop_signals

    torch.set_num_threads(1)
    ignore_stop_signals()


class _MicroBatches:
    """This rank's micro-batches from `start` to `steps`, made as they are read (a million-record epoch is
    never held as lists)."""

    def __init__(self, plan: BatchPlan, rank: int, start: int, steps: int):
        self.plan, self.rank, self.start, self.steps = plan, rank, start, steps

    def __iter__(self):
        return self.plan.iterate(self.rank, self.start, self.steps)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.plan.grad_accum


def make_loader(dataset, plan: BatchPlan, rank: int, start: int, steps: int, collator, num_workers: int):
    from torch.utils.data import DataLoader

    # its own generator: creating the iterator draws a seed, which from the global RNG would shift every later
    # random draw (LoRA dropout) of a resumed run against the uninterrupted one
    return DataLoader(dataset, batch_sampler=_MicroBatches(plan, rank, start, steps), collate_fn=collator,
                      num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if num_workers else None, generator=torch.Generator().manual_seed(start))
