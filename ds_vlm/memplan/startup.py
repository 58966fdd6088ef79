"""The planner inside the trainer (after preflight): `--max_tokens_per_batch auto`, the largest token budget
whose predicted peak fits the rank's memory with the planner's 10% margin, and the one-line plan at start.

Model states come from the loaded model's own parameters and DeepSpeed's partitioning (plan.ParamCounts),
activations from the trace of this data's worst micro-batch on fake tensors (plan_trace.py), cached in the data
cache keyed by the model config, the trainable flags, the batch and the worst sample's counts, so a restart
pays nothing. The memory is `--plan_memory_gb`, else the GPU's; a CPU run without it states the peak only.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Optional

from ds_vlm.config import AUTO_BUDGET, ConfigError
from ds_vlm.memplan.planner import MARGIN, ParamCounts, _bytes, step_peak
from ds_vlm.memplan.trace import Activations, trace_activations, worst_counts, worst_micro_batch
from ds_vlm.parallel.expert import ep_size_of

PLAN_CACHE_VERSION = 5
MAX_COPIES = 4096  # the search's bound on samples a micro-batch holds


def rank_memory(config) -> Optional[float]:
    """Bytes a rank has: --plan_memory_gb, else the GPU's; None on a CPU without the flag."""
    import torch

    if config.batch.plan_memory_gb:
        return config.batch.plan_memory_gb * 1e9
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


NCCL_RESERVE = 1e9  # NCCL's buffers on a multi-rank GPU run, allocated at the first collectives outside PyTorch's
# allocator (a stated allowance: ~0.3-1 GB a rank on 8 GPUs, more with NVLink SHARP)


def outside_torch(world: int, cuda_info: Optional[tuple[float, float, float]] = None) -> float:
    """Bytes of the rank's GPU that PyTorch's allocator cannot have, beyond the planner's 10% margin: what is
    taken outside it now (the CUDA context, cuBLAS workspaces, another process: total - free - reserved, read
    after the model loaded; `cuda_info` gives those three) and NCCL's buffers, which come later (NCCL_RESERVE,
    with more than one rank). 0 without a GPU."""
    import torch

    if cuda_info is None:
        if not torch.cuda.is_available():
            return 0.0
        free, total = torch.cuda.mem_get_info()
        cuda_info = (float(total), float(free), float(torch.cuda.memory_reserved()))
    total, free, reserved = cuda_info
    return max(0.0, total - free - reserved) + (NCCL_RESERVE if world > 1 else 0.0)


class RunPlanner:
    def __init__(self, config, loaded, ds_config: dict, world: int, checks, encoder):
        from ds_vlm.data.cache import cache_root, writable

        self.config, self.loaded, self.encoder = config, loaded, encoder
        zero = ds_config["zero_optimization"]
        self.bf16 = ds_config["bf16"]["enabled"]
        muon = ds_config["optimizer"]["type"] == "Muon"
        self.states = ParamCounts.of(loaded.model, muon=muon, ep=ep_size_of(ds_config)).states(
            zero.get("stage", 0), world, 2 if self.bf16 else 4, zero)
        self.longest, self.most_image = worst_counts(checks, config.data.max_length)
        self.sp = config.parallel.sequence_parallel
        self.root = writable(cache_root(config.data.data_cache))
        self._traced: dict[str, Activations] = {}  # this run's traces, by their cache key

    def traced(self, batch) -> Activations:
        """The worst micro-batch of `batch`'s settings, traced (or read from this run's or the data cache)."""
        import torch

        config, model = self.config, self.loaded.model
        key = hashlib.sha256(json.dumps(
            [PLAN_CACHE_VERSION, model.config.to_json_string(), asdict(config.model), batch.micro_batch_size,
             batch.max_tokens_per_batch, batch.packing, self.longest, self.most_image, self.sp, self.bf16],
            sort_keys=True, default=str).encode()).hexdigest()[:24]
        if key in self._traced:
            return self._traced[key]
        path = self.root / "plan" / f"{key}.json" if self.root is not None else None
        if path is not None and path.exists():
            act = Activations(**json.loads(path.read_text()))
        else:
            micro = worst_micro_batch(self.encoder, self.loaded.adapter, model.config, batch, self.sp, self.longest,
                                      self.most_image)
            act = trace_activations(model.config, config.model, self.loaded.adapter, micro,
                                    torch.bfloat16 if self.bf16 else torch.float32, self.sp)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(asdict(act)))
        self._traced[key] = act
        return act

    def peak(self, batch) -> float:
        return step_peak(self.states, self.traced(batch))

    def line(self, memory: Optional[float]) -> str:
        peak = self.peak(self.config.batch)
        said = (f"plan: predicted peak {_bytes(peak)} a rank (model states {_bytes(self.states.total)}, activations "
                f"{_bytes(peak - self.states.total)} for a micro-batch of the longest sample, {self.longest} tokens)")
        if memory is None:
            return said + "; on a CPU, no GPU memory to compare (--plan_memory_gb gives one)"
        if peak + MARGIN * memory <= memory:
            return said + f" of {memory / 1e9:.1f} GB: fits"
        return said + (f" of {memory / 1e9:.1f} GB: WILL NOT FIT: see `python -m ds_vlm.plan` for what would (ZeRO-3, "
                       "sequence parallelism, a smaller --max_tokens_per_batch)")

    def auto_budget(self, memory: float, outside: float = 0.0) -> tuple[int, str]:
        """The largest --max_tokens_per_batch (a whole number of the longest sample) whose predicted peak fits
        `memory` with the margin, less what PyTorch cannot have (`outside`: outside_torch's): traced at one and
        two samples, the line between them gives the count, which is traced and stepped down until it fits
        (activations grow about linearly in tokens)."""
        limit = (1 - MARGIN) * memory - outside
        kept = "10% kept for the allocator" + (f", {_bytes(outside)} outside PyTorch: CUDA context, NCCL" if outside
                                               else "")

        def peak_at(copies: int) -> float:
            return self.peak(replace(self.config.batch, max_tokens_per_batch=copies * self.longest))

        one = peak_at(1)
        if one > limit:
            raise ConfigError(f"--max_tokens_per_batch auto: even one sample of {self.longest} tokens (the longest) "
                              f"needs {_bytes(one)} a rank, over the {_bytes(limit)} usable of {_bytes(memory)} "
                              f"({kept}): see `python -m ds_vlm.plan` for what would fit")
        per_copy = max(1.0, peak_at(2) - one)
        copies = max(1, min(MAX_COPIES, 1 + math.floor((limit - one) / per_copy)))
        peak = peak_at(copies)
        while copies > 1 and peak > limit:
            copies = max(1, min(copies - 1, math.floor(copies * (limit - self.states.total)
                                                       / max(1.0, peak - self.states.total))))
            peak = peak_at(copies)
        budget = copies * self.longest
        return budget, (f"--max_tokens_per_batch auto: {budget} ({copies} x the longest sample, {self.longest} "
                        f"tokens): predicted peak {_bytes(peak)} a rank of {_bytes(memory)} ({kept})")


@contextmanager
def _own_rng():
    """The planner's random draws undone (rank 0's draws, LoRA dropout among them, stay the run's own)."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def plan_at_start(config, loaded, ds_config: dict, world: int, checks, encoder) -> list[str]:
    """What the trainer says of the plan at start (rank 0's lines; every rank calls it). `--max_tokens_per_batch
    auto` is resolved first, the same on every rank: a run that resumes takes its checkpoint's number (the
    batches, and so the run, stay exactly the uninterrupted one's), a new run the planner's on rank 0, shared (an
    error there stops every rank with its message). Then the one-line plan (--plan_at_start), which never stops
    a run: a model it cannot trace says so in the line. One planner for both, so the budget's traces serve the
    line too."""
    import ds_vlm.checkpoint.resume as ckpt
    import ds_vlm.runtime.distributed as comm

    rank0, said, planner = comm.rank() == 0, [], None
    batch = config.batch
    if batch.max_tokens_per_batch == AUTO_BUDGET:
        found = ckpt.resume_source(config.checkpoint)
        saved = int(ckpt.read_meta(found).run.config.get("max_tokens_per_batch", 0)) if found is not None else 0
        if saved > 0:
            batch.max_tokens_per_batch = saved
            said.append(f"--max_tokens_per_batch auto: {saved}, as the checkpoint {found.name} recorded it")
        else:
            result = (0, "")
            if rank0:
                memory = rank_memory(config)
                try:
                    if memory is None:
                        raise ConfigError("--max_tokens_per_batch auto needs the memory to fit into: a GPU, or "
                                          "--plan_memory_gb")
                    with _own_rng():
                        planner = RunPlanner(config, loaded, ds_config, world, checks, encoder)
                        outside = 0.0 if config.batch.plan_memory_gb else outside_torch(world)
                        result = planner.auto_budget(memory, outside)
                except ConfigError as err:
                    result = (0, str(err))
                except Exception as err:  # noqa: BLE001 - every rank must hear of it, not wait in the broadcast
                    result = (0, f"--max_tokens_per_batch auto: the planner failed ({type(err).__name__}: {err})")
            budget, message = comm.broadcast_object(result)
            if not budget:
                raise ConfigError(message)
            batch.max_tokens_per_batch = budget
            said.append(message)
    if config.logging.plan_at_start and rank0:
        try:
            with _own_rng():
                planner = planner or RunPlanner(config, loaded, ds_config, world, checks, encoder)
                said.append(planner.line(rank_memory(config)))
        except Exception as err:  # noqa: BLE001 - a forecast must never stop a run
            said.append(f"plan: could not trace this model ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
    return said
