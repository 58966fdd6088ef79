"""The optimizer step: a token-level mean loss over the global batch, with nothing waiting on the device."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import distributed as comm
from .attention import SampleBoundaries
from .loss import LabelLoss, LabelRows
from .metrics import peak_memory_gb, reset_peak_memory


class StepRunner:
    """One optimizer step over this rank's micro-batches, with the token-level mean loss over the global batch.

    DeepSpeed averages gradients over ranks; we skip its 1/grad_accum scaling and scale each micro-batch's
    summed loss by world_size / (label tokens in the global batch), so the update is d(sum of all token
    losses)/dθ divided by the global token count, whatever the split into ranks and accumulation steps.

    Nothing in a step waits for the device. The step's label tokens are counted on the host from the
    collated labels; their global sum is all-reduced from a device tensor started before the first forward
    and waited for just before the first backward (a stream wait on GPUs). Loss sums stay on the device and
    are all-reduced with the step's other numbers after the optimizer step; the returned `PendingStats`
    reads them (one host sync) only when the step is logged. (ZeRO-0 in fp32 is the exception: DeepSpeed
    keeps no grad norm there, so it is measured on the host to skip non-finite steps.)
    """

    def __init__(self, engine, world_size: int, dtype: torch.dtype, loss: LabelLoss, count_flops=None,
                 boundaries: Optional[SampleBoundaries] = None, sequence_parallel=None, phase=None):
        self.engine, self.world_size, self.dtype, self.loss = engine, world_size, dtype, loss
        self.boundaries, self.sp = boundaries, sequence_parallel
        self.phase = phase or (lambda name: None)  # tells the watchdog what the step is doing
        self.count_flops = count_flops or (lambda batch, n_label_rows, lengths: 0.0)
        self.device = engine.device
        self._plain_fp32 = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()

    def _grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def run(self, micro_batches: list[tuple[dict, dict]]) -> dict:
        """One optimizer step; waits for its logged sums."""
        return self.start(micro_batches).result()

    def start(self, micro_batches: list[tuple[dict, dict]], with_stats: bool = True, stop_requested: bool = False,
              bad_records: int = 0) -> "PendingStats":
        """One optimizer step; its numbers (loss, counts, grad norm, peak memory, skipped) come later, from
        `PendingStats.result()`, and only `with_stats` (a step that is not logged all-reduces nothing more).

        The step's one all-reduce of its own (the global label count, started before the first forward)
        also carries this rank's stop request and the bad records it left out: every rank learns, from the
        same sum, whether any rank asked to stop and how many records the step lost (`PendingStats.stop`,
        `.bad_records`, read at the end of the step, when the sum is long done)."""
        if with_stats:
            reset_peak_memory()
        all_rows = [LabelRows.from_labels(batch.pop("labels")) for batch, _ in micro_batches]
        label_rows = [self.local_rows(rows, batch) for rows, (batch, _) in zip(all_rows, micro_batches)]
        n_local = sum(len(rows) for rows in label_rows)
        # FLOPs from the shapes and each sample's length, before the forward takes the boundaries
        flops = sum(self.count_flops(batch, len(rows), meta["sample_lengths"])
                    for (batch, meta), rows in zip(micro_batches, all_rows)) if with_stats else 0.0
        votes = _on_device([float(n_local), float(stop_requested), float(bad_records)], self.device)
        counting = comm.all_reduce(votes, async_op=True)
        count = votes[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_norm, skip_plain, read_votes = None, False, None
        for i, ((batch, meta), rows) in enumerate(zip(micro_batches, label_rows)):
            self.phase("forward")
            summed = self.forward(batch, meta, rows)
            if i == 0:
                if counting is not None:
                    counting.wait()
                read_votes = _to_host(votes[1:])
            self.phase("backward")
            self.engine.backward(summed * (self.world_size / count).float(), scale_wrt_gas=False)
            if i == len(micro_batches) - 1 and self._plain_fp32:
                grad_norm = self._grad_norm()
                skip_plain = not math.isfinite(grad_norm)
                if skip_plain:  # what ZeRO 1-3 do on an invalid norm: drop the grads, no update
                    for param in self.engine.module.parameters():
                        param.grad = None
            self.phase("step")
            self.engine.step()  # per micro-batch: DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += summed.detach()
        applied = self.engine.was_step_applied() and not skip_plain
        stop, bad = read_votes()
        if not with_stats:
            return PendingStats(None, None, None, applied, stop > 0, int(bad))
        # a sequence-parallel group shares its micro-batches: each rank counts 1/N of their tokens and FLOPs
        share = 1 / self.sp.size if self.sp else 1
        host = [n_local] + [share * sum(meta[k] for _, meta in micro_batches) for k in ("tokens", "samples", "computed")]
        host.append(share * flops)
        memory = [0.0] * (2 * self.world_size)  # every rank fills its own slots: peak allocated (or RSS), reserved
        here = comm.rank()
        memory[here], memory[self.world_size + here] = peak_memory_gb()
        totals = torch.cat([loss_sum.view(1), _on_device(host + memory, self.device)])
        return PendingStats(totals, comm.all_reduce(totals, async_op=True), grad_norm if grad_norm is not None else
                            self.engine.get_global_grad_norm(), applied, stop > 0, int(bad), self.world_size)

    def local_rows(self, rows: LabelRows, batch: dict) -> LabelRows:
        """This rank's label rows: all of them, or under sequence parallelism those of its slice."""
        return rows if self.sp is None else self.sp.local_rows(rows, batch["input_ids"].shape[1])

    def forward(self, batch: dict, meta: dict, rows: LabelRows) -> torch.Tensor:
        """The summed loss of one micro-batch (this rank's slice of it under sequence parallelism); a packed
        one's sample boundaries go to the language model."""
        cu_seq_lens = batch.pop("cu_seq_lens", None)
        with contextlib.ExitStack() as stack:
            if cu_seq_lens is not None and self.boundaries is not None:
                stack.enter_context(self.boundaries.armed(cu_seq_lens.to(self.device, non_blocking=True),
                                                          meta["max_length"]))
            if self.sp is not None:
                stack.enter_context(self.sp.armed())
            return self.loss(self.engine, self.to_device(batch), rows.to(self.device))

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device (from pinned memory, without waiting); the pixels in the model's dtype, every
        other tensor as it is (Qwen's `second_per_grid_ts` are times in seconds: bf16 would round them)."""
        return {k: v.to(self.device, self.dtype, non_blocking=True) if k.startswith("pixel_values")
                else v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def eval_loss(self, micro_batches) -> dict:
        """Token-level mean loss over every rank's micro-batches, no update."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch, meta in micro_batches:
            rows = self.local_rows(LabelRows.from_labels(batch.pop("labels")), batch)
            totals[0] += self.forward(batch, meta, rows)
            totals[1] += len(rows)
        comm.all_reduce(totals)
        loss_sum, n_targets = totals.tolist()
        return {"eval_loss": loss_sum / max(1, n_targets), "eval_targets": int(n_targets)}


@dataclass
class PendingStats:
    """A step's numbers, all-reduced in the background; `result()` waits and reads them (one host sync)."""

    totals: Optional[torch.Tensor]  # loss sum, label tokens, tokens, samples, computed, flops, peak GB per rank x2
    work: Any
    grad_norm: Any                  # a float or a device tensor (DeepSpeed's), read in result()
    applied: bool                   # the optimizer step was taken (False: non-finite gradients, skipped)
    stop: bool = False              # some rank asked to stop (a preemption signal) before this step began
    bad_records: int = 0            # records all ranks left out of this step for being bad (--preflight off)
    world_size: int = 1

    def result(self) -> dict:
        if self.work is not None:
            self.work.wait()
        loss_sum, n_targets, n_tokens, n_samples, n_computed, flops, *memory = self.totals.tolist()
        loss = loss_sum / n_targets if n_targets else math.nan  # a step with no label token (all its records bad)
        norm = float(self.grad_norm) if self.grad_norm is not None else None
        peak, reserved = memory[:self.world_size], memory[self.world_size:]
        return {"loss": loss, "targets": int(n_targets), "tokens": int(n_tokens), "samples": int(n_samples),
                "computed": int(n_computed), "flops": flops, "peak_mem_gb": [round(m, 4) for m in peak],
                "peak_reserved_gb": [round(m, 4) for m in reserved] if any(reserved) else None,
                "grad_norm": norm if norm is not None and math.isfinite(norm) else None,
                "skipped": not (self.applied and math.isfinite(loss))}


def _on_device(values: list[float], device) -> torch.Tensor:
    """Host numbers as a float64 device tensor, copied without blocking the host (pinned on GPUs)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _to_host(tensor: torch.Tensor):
    """Start copying a small device tensor to the host; returns a function that waits for the copy (by then
    long done: it is queued before the step's backward) and gives its values."""
    if tensor.device.type != "cuda":
        return lambda: tensor.tolist()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read():
        done.synchronize()
        return host.tolist()

    return read
