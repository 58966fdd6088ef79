"""The step log: each logged step's line in metrics.jsonl (and the reporter's), written one step late.

A logged step's numbers are summed over the ranks without a collective of their own: the step log holds the
step, hands its totals to the next step's label-count all-reduce (`carry`), and writes its line once that
step has started (`next`), reading the sum then (the one host sync of a logged step). Before a pause or a
stop (a save, an evaluation, the end) the loop `flush`es it: the held step all-reduces its own totals. It
also times the steps: a save or an evaluation between two steps counts in neither (`restart_clock`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from ds_vlm.runtime.run_log import Reporter, RunLog, StepRecord
from ds_vlm.train.step import InFlight, PendingStep


@dataclass
class _Held:
    """A logged step whose line is not written yet."""

    step: int
    pending: PendingStep
    seconds: float
    lr: float


class StepLog:
    def __init__(self, log: RunLog, reporter: Reporter, every: int, total_steps: int, world_size: int,
                 peak_tflops: Optional[float]):
        self.log, self.reporter = log, reporter
        self.every, self.total_steps = every, total_steps  # --logging_steps; the last step is logged too
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.held: Optional[_Held] = None
        self.clock = time.perf_counter()  # when the last step (or save, or evaluation) ended

    def wants(self, step: int) -> bool:
        """Whether `step` is logged (its numbers summed at all): the same answer on every rank."""
        return step % self.every == 0 or step == self.total_steps

    def carry(self) -> Optional[torch.Tensor]:
        """The held step's totals, for the next step's all-reduce to sum (None: no step held)."""
        return self.held.pending.totals if self.held is not None else None

    def next(self, step: int, pending: PendingStep, lr: float, skipped_steps: int) -> None:
        """`step` has started (its `pending.carried`: the held step's sum): the held step's line is written, and
        `step` held if it is logged. `skipped_steps`: the run's skipped steps so far."""
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        self._write(pending.carried, skipped_steps)
        if self.wants(step):
            self.held = _Held(step, pending, seconds, lr)

    def flush(self, skipped_steps: int) -> None:
        """The held step's line, its totals all-reduced on their own (no step follows it before a pause)."""
        self._write(None, skipped_steps)

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def _write(self, summed: Optional[InFlight], skipped_steps: int) -> None:
        held, self.held = self.held, None
        if held is None:
            return
        record = StepRecord.of(held.step, held.pending.stats(summed), held.seconds, held.lr, self.world_size,
                               self.peak_tflops, skipped_steps)
        self.log.step(record)
        self.reporter.log(held.step, record.to_json())
