"""The global-batch plan: which dataset positions each data-parallel rank sees in each micro-step of each
optimizer step; a pure function of the seed, the epoch and the step, which is what makes resume exact."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from ds_vlm.config import AUTO_BUDGET

if TYPE_CHECKING:
    from ds_vlm.config import BatchConfig
    from ds_vlm.data.sources import RecordIndex


def epoch_order(n_samples: int, seed: int, epoch: int, source_sizes: Optional[list[int]] = None,
                weights: Optional[list[float]] = None, repeats: Optional[list[float]] = None) -> list[int]:
    """Dataset positions of one epoch, seeded by (seed, epoch).

    Without weights or repeats: a permutation of all samples. With weights (sources laid out one after
    the other in position space), source i contributes round(w_i / sum(w) * n_samples)
    draws: its own permutation, repeated when it must be upsampled, cut when downsampled. With repeats
    (a mixture file's repeat_time), source i contributes round(r_i * size_i) draws the same way.
    """
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    weighted = bool(weights) and weights[0] is not None
    repeated = bool(repeats) and any(r != 1 for r in repeats)
    if not weighted and not repeated:
        return torch.randperm(n_samples, generator=generator).tolist()
    draws, offset, total_weight = [], 0, sum(weights) if weighted else 0
    for number, size in enumerate(source_sizes):
        wanted = (round(weights[number] / total_weight * n_samples) if weighted
                  else round(repeats[number] * size))
        if size:
            rounds = [torch.randperm(size, generator=generator) + offset for _ in range(math.ceil(wanted / size))]
            draws.extend(torch.cat(rounds)[:wanted].tolist() if rounds else [])
        offset += size
    return [draws[i] for i in torch.randperm(len(draws), generator=generator).tolist()]


@dataclass
class BatchPlan:
    """Which dataset positions each data-parallel rank sees in each micro-step of each optimizer step.

    Epoch e is `epoch_order(e)`. Optimizer step s of the epoch takes the next `global_batch`
    positions; sample j of that global batch goes to slot j mod (dp_size * grad_accum), slot k being
    (accumulation step k // dp_size, data-parallel rank k % dp_size). The last step of an epoch is
    smaller: nothing is dropped or repeated, and a rank whose micro-batch comes up empty runs a fully
    masked dummy (it adds 0 to the loss and keeps the collectives in step). The set of samples in a
    global step does not depend on the number of ranks, which is what lets a run resume on another one.

    Two caches, both derived: each epoch's number of steps (`_steps`, computed once per epoch), and the
    micro-batches of the epoch last read (`_epoch`: one epoch at a time, never the whole run).
    """

    n_samples: int
    micro_batch_size: int
    grad_accum: int
    dp_size: int  # data-parallel ranks (the world size over the sequence-parallel size)
    seed: int
    source_sizes: Optional[list[int]] = None
    weights: Optional[list[float]] = None
    repeats: Optional[list[float]] = None
    _steps: dict = field(default_factory=dict, init=False, repr=False)
    _epoch: tuple = field(default=(None, None), init=False, repr=False)

    @property
    def slots(self) -> int:
        """Micro-batches per optimizer step over all data-parallel ranks."""
        return self.dp_size * self.grad_accum

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.slots

    @property
    def steps_per_epoch(self) -> int:
        """The first epoch's steps (token-budget plans: later epochs may differ by a step or two)."""
        return self.epoch_steps(0)

    def epoch_steps(self, epoch: int) -> int:
        if epoch not in self._steps:
            self._steps[epoch] = math.ceil(len(self._micro_batches_of(epoch)) / self.slots)
        return self._steps[epoch]

    def epoch_order(self, epoch: int) -> list[int]:
        return epoch_order(self.n_samples, self.seed, epoch, self.source_sizes, self.weights, self.repeats)

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """The epoch as a list of micro-batches in slot order (step, accumulation step, rank)."""
        order = self.epoch_order(epoch)
        out = []
        for offset in range(0, len(order), self.global_batch):
            chosen = order[offset:offset + self.global_batch]
            out.extend(chosen[k::self.slots] for k in range(self.slots))
        return out

    def _micro_batches_of(self, epoch: int) -> list[list[int]]:
        if self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_micro_batches(epoch))
        return self._epoch[1]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of a global step; epochs may differ in length (token budgets)."""
        epoch = 0
        while step >= self.epoch_steps(epoch):
            step -= self.epoch_steps(epoch)
            epoch += 1
        return epoch, step

    def steps_in(self, epochs: int) -> int:
        """Optimizer steps in the first `epochs` epochs."""
        return sum(self.epoch_steps(e) for e in range(epochs))

    def micro_batches(self, step: int, rank: Optional[int]) -> list[list[int]]:
        """This data-parallel rank's micro-batches of `step` (every rank's if rank is None)."""
        epoch, offset = self.locate(step)
        mine = self._micro_batches_of(epoch)[offset * self.slots:(offset + 1) * self.slots]
        mine += [[] for _ in range(self.slots - len(mine))]
        return mine if rank is None else [mine[a * self.dp_size + rank] for a in range(self.grad_accum)]

    def step_samples(self, step: int) -> list[int]:
        """Every dataset position of `step`, all ranks and accumulation steps."""
        return [i for mb in self.micro_batches(step, None) for i in mb]

    def iterate(self, rank: int, start_step: int, total_steps: int) -> Iterator[list[int]]:
        """Micro-batches (lists of dataset positions) for this data-parallel rank, from start_step on."""
        for step in range(start_step, total_steps):
            yield from self.micro_batches(step, rank)


@dataclass
class TokenBudgetPlan(BatchPlan):
    """Micro-batches formed by a token budget instead of a fixed size.

    Each epoch's order is cut into windows of 64 x dp_size x grad_accum samples; each window is sorted by
    length and filled greedily so that the tokens the forward computes over (longest sample x count; with
    `packing`, the sum of the lengths) stay within `max_tokens`; the micro-batches are then shuffled (seeded)
    and dealt to the slots of successive optimizer steps. Every sample of the epoch is used once; the last
    step may leave slots empty (masked dummies). Samples per step vary; the loss stays a token-level mean over
    the global batch.
    """

    lengths: Optional[list[int]] = None
    max_tokens: int = 0
    window: int = 64
    packing: bool = False  # a packed micro-batch costs the sum of its lengths, a padded one longest x count

    def _cost(self, current: list[int], candidate: int) -> int:
        """Tokens the forward computes over if `candidate` joins the micro-batch `current`."""
        if self.packing:
            return sum(self.lengths[i] for i in current) + self.lengths[candidate]
        return max(self.lengths[candidate], *(self.lengths[i] for i in current)) * (len(current) + 1)

    def epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        order, span = self.epoch_order(epoch), self.window * self.slots
        filled: list[list[int]] = []
        for start in range(0, len(order), span):
            current = []
            for i in sorted(order[start:start + span], key=lambda i: self.lengths[i]):
                if current and self._cost(current, i) > self.max_tokens:
                    filled.append(current)
                    current = []
                current.append(i)
            if current:
                filled.append(current)
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch + 7)
        return [filled[i] for i in torch.randperm(len(filled), generator=generator)]


def make_plan(batch: BatchConfig, seed: int, dp_size: int, records: RecordIndex, kept) -> BatchPlan:
    """Fixed-size micro-batches, or token-budget ones with --max_tokens_per_batch (`kept`: preflight's Checks
    of the usable records)."""
    if batch.max_tokens_per_batch == AUTO_BUDGET:
        raise ValueError("--max_tokens_per_batch auto: the trainer resolves it at start from the model and the "
                         "memory (ds_vlm/memplan/startup.py); batches are planned with the number")
    common = dict(n_samples=len(kept), micro_batch_size=batch.micro_batch_size, grad_accum=batch.grad_accum,
                  dp_size=dp_size, seed=seed, source_sizes=records.source_sizes(kept.index), weights=records.weights,
                  repeats=records.repeats)
    if batch.max_tokens_per_batch:
        return TokenBudgetPlan(**common, lengths=kept.n_tokens.tolist(), max_tokens=batch.max_tokens_per_batch,
                               packing=batch.packing)
    return BatchPlan(**common)
