"""The optimizer step: a token-level mean loss over the global batch, with nothing waiting on the device."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

import ds_vlm.runtime.distributed as comm
from ds_vlm.data.batching import MicroBatch
from ds_vlm.runtime.memory import MemoryMeter
from ds_vlm.train.forward import ForwardContext
from ds_vlm.train.loss import LabelRows, to_device


@dataclass
class StepStats:
    """What one optimizer step reports (summed over every rank)."""

    loss: float                 # token-level mean over the global batch (nan: a step with no label token)
    targets: int                # label tokens
    tokens: int                 # real tokens
    samples: int
    computed: int               # tokens the forwards computed over (padding and dummies included)
    flops: float                # model FLOPs (runtime/flops.FlopsCounter)
    peak_mem_gb: list[float]    # per rank: the step's peak allocated GPU memory, or peak RSS on a CPU
    peak_reserved_gb: Optional[list[float]]  # per rank, CUDA's reserved peak (None on a CPU)
    peak_tensor_gb: Optional[list[float]]    # per rank, the step's peak of live tensor bytes (ds_vlm/runtime/memory.py;
                                             # None on a CPU without --measure_memory)
    grad_norm: Optional[float]  # before clipping; None where it was not finite
    skipped: bool               # no update was applied (non-finite loss or gradients)
    router_aux_loss: Optional[float] = None  # MoE: the router's auxiliary loss, mean per label token (before its
                                             # coefficient); None where the config asks for none


# The sums a logged step all-reduces, in the order they travel in one float64 tensor (then 3 x world sizes of
# memory, peak / reserved / tensor: each rank fills its own slots, the others add 0).
_SUMMED = ("loss_sum", "aux_sum", "targets", "tokens", "samples", "computed", "flops")


@dataclass
class InFlight:
    """A sum on its way: the tensor an all-reduce writes into, and the all-reduce's handle."""

    values: torch.Tensor
    work: Any

    @classmethod
    def all_reduce(cls, tensor: torch.Tensor) -> InFlight:
        return cls(tensor, comm.all_reduce(tensor, async_op=True) or _Done())

    def read(self) -> list[float]:
        """Waits for the sum (the one host sync of a logged step) and reads it."""
        self.work.wait()
        return self.values.tolist()


@dataclass
class PendingStep:
    """A step, done on the host. `stop` and `bad_records` are known at once (they rode the step's label-count
    all-reduce). Its other numbers (`totals`, this rank's) are summed over the ranks later: by the next step's
    label-count all-reduce when that step is started with `carry=` them (the trainer's step log: one
    collective a step, not two; that step's `carried` holds their sum), or, when no step followed (before a
    save, an eval, a stop, the last step), by `stats()` itself. Every rank takes the same path: whether a step
    was logged, carried or read at a boundary depends only on the step number and on the all-reduced stop
    vote."""

    applied: bool                   # the optimizer step was taken (False: non-finite gradients, skipped)
    stop: bool                      # some rank asked to stop (a preemption signal) before this step began
    bad_records: int                # records all ranks left out of this step for being bad (--preflight off)
    totals: Optional[torch.Tensor] = None  # the _SUMMED values, then the memory slots; None: not logged
    grad_norm: Any = None           # a float or a device tensor (DeepSpeed's), read in stats()
    world_size: int = 1
    router_aux: bool = False        # the step added the router's auxiliary loss (aux_sum means something)
    carried: Optional[InFlight] = None  # the sum of the `carry` this step was started with (the step before's)

    def stats(self, summed: Optional[InFlight] = None) -> StepStats:
        """The step's numbers; `summed`: its totals' sum, carried by a later step's all-reduce (None: all-reduced
        here)."""
        values = (summed or InFlight.all_reduce(self.totals)).read()
        summed = dict(zip(_SUMMED, values))
        memory = values[len(_SUMMED):]
        n = self.world_size
        peak, reserved, tensor = memory[:n], memory[n:2 * n], memory[2 * n:]
        targets = int(summed["targets"])
        loss = summed["loss_sum"] / targets if targets else math.nan  # a step with no label token (all bad)
        norm = float(self.grad_norm) if self.grad_norm is not None else None
        return StepStats(loss=loss, targets=targets, tokens=int(summed["tokens"]), samples=int(summed["samples"]),
                         computed=int(summed["computed"]), flops=summed["flops"],
                         peak_mem_gb=[round(m, 4) for m in peak],
                         peak_reserved_gb=[round(m, 4) for m in reserved] if any(reserved) else None,
                         peak_tensor_gb=[round(m, 4) for m in tensor] if any(tensor) else None,
                         grad_norm=norm if norm is not None and math.isfinite(norm) else None,
                         skipped=not (self.applied and math.isfinite(loss)),
                         router_aux_loss=summed["aux_sum"] / targets if self.router_aux and targets else None)


class StepRunner:
    """One optimizer step over this rank's micro-batches, with the token-level mean loss over the global batch.

    DeepSpeed averages gradients over ranks; we skip its 1/grad_accum scaling and scale each micro-batch's
    summed loss by world_size / (label tokens in the global batch), so the update is d(sum of all token
    losses)/dθ divided by the global token count, whatever the split into ranks and accumulation steps.

    Nothing in a step waits for the device. The step's label tokens are counted on the host from the
    collated labels; their global sum is all-reduced from a device tensor started before the first forward
    and waited for just before the first backward (a stream wait on GPUs). Loss sums stay on the device and
    are all-reduced with the step's other numbers after the optimizer step; `PendingStep.stats()` reads them
    (one host sync) only when the step is logged. (ZeRO-0 in fp32 is the exception: DeepSpeed keeps no grad
    norm there, so it is measured on the host to skip non-finite steps.)
    """

    def __init__(self, engine, world_size: int, context: ForwardContext, count_flops=None, phase=None,
                 measure_memory: bool = False):
        self.engine, self.world_size, self.context = engine, world_size, context
        self.memory = MemoryMeter(measure_memory, engine.module.parameters())
        self.sp = context.sp
        self.phase = phase or (lambda name: None)  # tells the watchdog what the step is doing
        self.count_flops = count_flops or (lambda inputs, n_label_rows, lengths: 0.0)
        self.device = engine.device
        self._plain_fp32 = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()

    def start(self, micro_batches: list[MicroBatch], with_stats: bool = True, stop_requested: bool = False,
              bad_records: int = 0, carry: Optional[torch.Tensor] = None) -> PendingStep:
        """One optimizer step; its numbers come later, from `PendingStep.stats()`, and only `with_stats` (a
        step that is not logged sums nothing more).

        The step's one all-reduce (the global label count, started before the first forward) also carries this
        rank's stop request and the bad records it left out: every rank learns, from the same sum, whether any
        rank asked to stop and how many records the step lost (read at the end of the step, when the sum is
        long done); and `carry`, numbers still to be summed (the previous step's totals, logged while this one
        runs): their sum is the returned step's `carried`."""
        if with_stats:
            self.memory.start()
        all_rows = [LabelRows.from_labels(micro.labels) for micro in micro_batches]
        label_rows = [self.local_rows(rows, micro) for rows, micro in zip(all_rows, micro_batches)]
        n_local = sum(len(rows) for rows in label_rows)
        # FLOPs from the shapes and each sample's length (the host's numbers, no device involved)
        flops = sum(self.count_flops(micro.inputs, len(rows), micro.sample_lengths)
                    for micro, rows in zip(micro_batches, all_rows)) if with_stats else 0.0
        votes = _on_device([float(n_local), float(stop_requested), float(bad_records)], self.device)
        if carry is not None:
            votes = torch.cat([votes, carry])
        counting = comm.all_reduce(votes, async_op=True)
        carried = None if carry is None else InFlight(votes[3:], counting or _Done())  # a view: the sum lands in it
        count = votes[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_norm, skip_plain, read_votes = None, False, None
        for i, (micro, rows) in enumerate(zip(micro_batches, label_rows)):
            self.phase("forward")
            summed, aux = self.forward(micro, rows)
            if i == 0:
                if counting is not None:
                    counting.wait()
                read_votes = _to_host(votes[1:3])
            self.phase("backward")
            objective = summed if aux is None else summed + self.context.router_aux_coef * aux
            self.engine.backward(objective * (self.world_size / count).float(), scale_wrt_gas=False)
            if i == len(micro_batches) - 1 and self._plain_fp32:
                grad_norm = self._grad_norm()
                skip_plain = not math.isfinite(grad_norm)
                if skip_plain:  # what ZeRO 1-3 do on an invalid norm: drop the grads, no update
                    for param in self.engine.module.parameters():
                        param.grad = None
            self.phase("step")
            self.engine.step()  # per micro-batch: DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += summed.detach()
            if aux is not None:
                aux_sum += aux.detach()
        stop, bad = read_votes()
        pending = PendingStep(self.engine.was_step_applied() and not skip_plain, stop > 0, int(bad), carried=carried)
        if not with_stats:
            return pending
        # a sequence-parallel group shares its micro-batches: each rank counts 1/N of their tokens and FLOPs
        share = 1 / self.sp.size if self.sp else 1
        host = [n_local, *(share * sum(getattr(m, k) for m in micro_batches) for k in _SUMMED[3:6]), share * flops]
        # every rank fills its own slots: peak allocated (or RSS), reserved, live tensors
        memory, here, n = [0.0] * (3 * self.world_size), comm.rank(), self.world_size
        memory[here], memory[n + here], memory[2 * n + here] = self.memory.read()
        pending.totals = torch.cat([loss_sum.view(1), aux_sum.view(1), _on_device(host + memory, self.device)])
        pending.router_aux = bool(self.context.router_aux_coef)
        pending.grad_norm = grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()
        pending.world_size = self.world_size
        return pending

    def local_rows(self, rows: LabelRows, micro: MicroBatch) -> LabelRows:
        """This rank's label rows: all of them, or under sequence parallelism those of its slice."""
        return rows if self.sp is None else self.sp.local_rows(rows, micro.labels.shape[1])

    def forward(self, micro: MicroBatch, rows: LabelRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The summed loss of one micro-batch (this rank's slice of it under sequence parallelism), and the MoE
        router's auxiliary loss times its label rows where the config asks for it (else None): the objective
        is summed + coef x that, so that after the division by the global label count each micro-batch adds
        coef x its aux loss, weighted by its share of the label tokens (one micro-batch: transformers' own
        `loss + coef x aux_loss`)."""
        with self.context.armed(micro, rows) as forward:
            output = self.engine(**forward.inputs)  # through the engine: ZeRO-3 gathers every module, the head too
        return forward.loss(output), forward.router_aux(output, len(rows))

    def _grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    @torch.no_grad()
    def eval_loss(self, micro_batches) -> dict:
        """Token-level mean loss over every rank's micro-batches, no update."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for micro in micro_batches:
            rows = self.local_rows(LabelRows.from_labels(micro.labels), micro)
            totals[0] += self.forward(micro, rows)[0]
            totals[1] += len(rows)
        comm.all_reduce(totals)
        loss_sum, n_targets = totals.tolist()
        return {"eval_loss": loss_sum / max(1, n_targets), "eval_targets": int(n_targets)}


class _Done:
    """The work handle of a collective that did not run (one process)."""

    def wait(self) -> None:
        pass


def _on_device(values: list[float], device) -> torch.Tensor:
    """Host numbers as a float64 device tensor, copied without blocking the host (pinned on GPUs)."""
    return to_device(torch.tensor(values, dtype=torch.float64), device)


def _to_host(tensor: torch.Tensor):
    """Start copying a small device tensor to the host; returns a function that waits for the copy (by then
    long done: it is queued before the step's backward, and DeepSpeed's own step waits for the device) and
    gives its values."""
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
