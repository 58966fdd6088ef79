"""The planner inside the trainer (rank 0, after preflight): the one-line plan at start, and
`--max_tokens_per_batch auto`, the largest token budget whose predicted peak fits the rank's memory with the
planner's 10% margin.

Model states come from the loaded model's own parameters and DeepSpeed's partitioning (plan.model_states),
activations from the trace of this data's worst micro-batch on fake tensors (plan_trace.py), cached in the data
cache keyed by the model config, the trainable flags, the batch and the worst sample's counts, so a restart
pays nothing. The memory is `--plan_memory_gb`, else the GPU's; a CPU run without it states the peak only.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, replace
from typing import Optional

from .config import ConfigError
from .plan import MARGIN, _bytes, model_states, persistent_numel, step_peak
from .plan_trace import Activations, trace_activations, worst_micro_batch

PLAN_CACHE_VERSION = 4
MAX_COPIES = 4096  # the search's bound on samples a micro-batch holds


def rank_memory(config) -> Optional[float]:
    """Bytes a rank has: --plan_memory_gb, else the GPU's; None on a CPU without the flag."""
    import torch

    if config.batch.plan_memory_gb:
        return config.batch.plan_memory_gb * 1e9
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


class RunPlanner:
    def __init__(self, config, loaded, ds_config: dict, world: int, checks, encoder):
        from .data.preflight import OK

        self.config, self.loaded, self.encoder = config, loaded, encoder
        model = loaded.model
        zero = ds_config["zero_optimization"]
        self.bf16 = ds_config["bf16"]["enabled"]
        params = list(model.parameters())
        sizes = [int(getattr(p, "ds_numel", p.numel())) for p in params]  # ZeRO-3: the full sizes
        n_trained = sum(n for n, p in zip(sizes, params) if p.requires_grad)
        block = max((sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters(recurse=False))
                     for m in model.modules()), default=0)
        largest = max((n for n, p in zip(sizes, params) if p.requires_grad), default=0)
        self.states = model_states(sum(sizes), n_trained, zero.get("stage", 0), world, 2 if self.bf16 else 4, zero,
                                   block, persistent_numel(sizes, zero), largest)
        ok = checks.kind == OK
        self.longest = int(checks.n_tokens[ok].max()) if ok.any() else config.data.max_length
        self.most_image = int(checks.n_image_tokens[ok].max()) if ok.any() else 0
        self.sp = config.parallel.sequence_parallel

    def traced(self, batch) -> Activations:
        """The worst micro-batch of `batch`'s settings, traced (or read from the data cache)."""
        import torch

        from .data.cache import cache_root, writable

        config, model = self.config, self.loaded.model
        key = hashlib.sha256(json.dumps(
            [PLAN_CACHE_VERSION, model.config.to_json_string(), asdict(config.model), batch.micro_batch_size,
             batch.max_tokens_per_batch, batch.packing, self.longest, self.most_image, self.sp, self.bf16],
            sort_keys=True, default=str).encode()).hexdigest()[:24]
        root = writable(cache_root(config.data.data_cache))
        path = root / "plan" / f"{key}.json" if root is not None else None
        if path is not None and path.exists():
            return Activations(**json.loads(path.read_text()))
        micro = worst_micro_batch(self.encoder, self.loaded.adapter, model.config, batch, self.sp, self.longest,
                                  self.most_image)
        act = trace_activations(config.model.path, model.config, config.model, self.loaded.adapter, "sdpa", micro,
                                torch.bfloat16 if self.bf16 else torch.float32, self.sp)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(act)))
        return act

    def peak(self, batch) -> float:
        return step_peak(self.states, self.traced(batch), self.sp)

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

    def auto_budget(self, memory: float) -> tuple[int, str]:
        """The largest --max_tokens_per_batch (a whole number of the longest sample) whose predicted peak fits
        `memory` with the margin: traced at one and two samples, the line between them gives the count, which
        is traced and stepped down until it fits (activations grow about linearly in tokens)."""
        limit = (1 - MARGIN) * memory

        def peak_at(copies: int) -> float:
            return self.peak(replace(self.config.batch, max_tokens_per_batch=copies * self.longest))

        one = peak_at(1)
        if one > limit:
            raise ConfigError(f"--max_tokens_per_batch auto: even one sample of {self.longest} tokens (the longest) "
                              f"needs {_bytes(one)} a rank, over the {_bytes(limit)} usable of {_bytes(memory)} "
                              "(10% kept for the allocator): see `python -m ds_vlm.plan` for what would fit")
        per_copy = max(1.0, peak_at(2) - one)
        copies = max(1, min(MAX_COPIES, 1 + math.floor((limit - one) / per_copy)))
        peak = peak_at(copies)
        while copies > 1 and peak > limit:
            copies = max(1, min(copies - 1, math.floor(copies * (limit - self.states.total)
                                                       / max(1.0, peak - self.states.total))))
            peak = peak_at(copies)
        budget = copies * self.longest
        return budget, (f"--max_tokens_per_batch auto: {budget} ({copies} x the longest sample, {self.longest} "
                        f"tokens): predicted peak {_bytes(peak)} a rank of {_bytes(memory)} (10% kept)")


def startup_line(config, loaded, ds_config: dict, world: int, checks, encoder) -> str:
    """The trainer's one-line plan, never stopping a run: a model it cannot trace says so in the line; its
    random draws are undone (rank 0's draws, LoRA dropout among them, stay the run's own)."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            return RunPlanner(config, loaded, ds_config, world, checks, encoder).line(rank_memory(config))
    except Exception as err:  # noqa: BLE001 - a forecast must never stop a run
        return f"plan: could not trace this model ({type(err).__name__}: {str(err).splitlines()[0][:160]})"


def auto_budget(config, loaded, ds_config: dict, world: int, checks, encoder) -> tuple[int, str]:
    """`--max_tokens_per_batch auto` resolved (rank 0; the trainer shares it with every rank)."""
    import torch

    memory = rank_memory(config)
    if memory is None:
        raise ConfigError("--max_tokens_per_batch auto needs the memory to fit into: a GPU, or --plan_memory_gb")
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        return RunPlanner(config, loaded, ds_config, world, checks, encoder).auto_budget(memory)


def resolve_auto_budget(config, loaded, ds_config: dict, world: int, checks, encoder) -> Optional[str]:
    """Set `config.batch.max_tokens_per_batch` where it is `auto`, the same on every rank, and say how (None
    where it was a number): a run that resumes takes its checkpoint's number (the batches, and so the run, stay
    exactly the uninterrupted one's), a new run the planner's on rank 0, shared (an error there stops every
    rank with its message)."""
    from . import checkpoint as ckpt
    from . import distributed as comm
    from .config import AUTO_BUDGET

    batch = config.batch
    if batch.max_tokens_per_batch != AUTO_BUDGET:
        return None
    found = None
    if config.checkpoint.resume != "none":
        found = ckpt.find_checkpoint(config.checkpoint.output_dir if config.checkpoint.resume == "auto"
                                     else config.checkpoint.resume)
    saved = int(ckpt.read_meta(found)["config"].get("max_tokens_per_batch", 0)) if found is not None else 0
    if saved > 0:
        batch.max_tokens_per_batch = saved
        return f"--max_tokens_per_batch auto: {saved}, as the checkpoint {found.name} recorded it"
    result = (0, "")
    if comm.rank() == 0:
        try:
            result = auto_budget(config, loaded, ds_config, world, checks, encoder)
        except ConfigError as err:
            result = (0, str(err))
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, not wait in the broadcast
            result = (0, f"--max_tokens_per_batch auto: the planner failed ({type(err).__name__}: {err})")
    budget, said = comm.broadcast_object(result)
    if not budget:
        raise ConfigError(said)
    batch.max_tokens_per_batch = budget
    return said
