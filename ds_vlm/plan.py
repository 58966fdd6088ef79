"""Know before you launch: each GPU's peak memory and the step time of a run, from the model's config alone.

    python -m ds_vlm.plan --model Qwen/Qwen3-VL-2B-Instruct --deepspeed ds_configs/zero3.json --world_size 8 \\
        --gpu h100-80gb [--train_data D] [--max_tokens_per_batch 65536 --packing] [--out plan.json]

The trainer's own flags and --config (same parser, same validation), plus --world_size (all ranks over all
nodes), --gpu NAME (GPUS below) or --gpu_memory_gb G, --mfu (the step time's assumption), --out.

How (execute, don't guess):
- Model states from DeepSpeed's partitioning over the data-parallel ranks (`model_states`): the weights in
  the run's precision (1/N of them under ZeRO-3), gradients (bf16 ones while they are reduced; ZeRO-2/3
  keep 1/N in fp32), the optimizer's fp32 master copy and AdamW's two moments (1/N from ZeRO-1 on; none on
  the GPU with `offload_optimizer`), ZeRO's reduce bucket and, under ZeRO-3, the gathered live parameters
  (`stage3_max_live_parameters`, `stage3_prefetch_bucket_size`). Which parameters train (frozen vision
  tower, LoRA adapters) is read from the real model built on the meta device with the trainer's own
  `set_trainable` and `apply_lora`.
- Activations by running the real model's forward and backward on one worst-case micro-batch under
  PyTorch's FakeTensorMode (shapes only: no weights, no GPU), every storage it creates followed from
  creation to release (`LiveBytes`, a dispatch mode; the gradients left out): the trainer's label-row loss,
  activation checkpointing and packing positions, attention as
  the kernel the target runs (on a GPU: no L x L matrix; on a CPU, what the CPU run uses). The worst
  micro-batch: from this data's preflight counts with --train_data (the longest sample, the most image
  tokens), else --max_tokens_per_batch or --max_length filled with one image of the processor's largest size.
- The largest token budget that fits: the traced activations scaled per token (they grow linearly in tokens
  with checkpointing and a varlen/flash kernel); the trace itself is in plan_trace.py.

Printed: each part per rank, the total against the GPU (with an allocator margin), the largest budget that
fits, the step's FLOPs (the trainer's FlopsCounter) and its time and tokens/s at the stated MFU, and when it
does not fit, what would. `--out` writes it all; `peak_gb_per_rank` and `max_tokens_per_batch_that_fits`
keep their names.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from .plan_trace import no_zero3_init, trace_activations, worst_micro_batch

GIB = 1 << 30
# name: (memory as torch reports it, dense bf16 peak TFLOP/s: the table metrics.py's MFU uses)
GPUS = {"h100-80gb": (80 * GIB, 989.0), "h200": (140 * GIB, 989.0), "h800": (80 * GIB, 989.0),
        "a100-80gb": (80 * GIB, 312.0), "a100-40gb": (40 * GIB, 312.0), "a800-80gb": (80 * GIB, 312.0),
        "l40s": (48 * GIB, 362.0), "l40": (48 * GIB, 181.0), "a6000": (48 * GIB, 155.0), "a10g": (24 * GIB, 125.0),
        "l4": (24 * GIB, 121.0), "4090": (24 * GIB, 165.0), "v100-32gb": (32 * GIB, 125.0)}
DEFAULT_MFU = 0.35  # an assumption, stated in the output: a dense 2B-8B fine-tune on H100s reaches 30-45%
MARGIN = 0.10       # the allocator's fragmentation and CUDA context, as a share of the GPU


@dataclass
class ModelStates:
    weights: float
    gradients: float
    optimizer: float
    buckets: float
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buckets


def model_states(n_params: int, n_trained: int, stage: int, world: int, bytes_per_param: int,
                 zero: Optional[dict] = None, largest_module: int = 0) -> ModelStates:
    """Per-rank bytes of weights, gradients, optimizer states and ZeRO's buffers (see the module docstring).
    `bytes_per_param`: 2 in bf16, 4 in fp32; `largest_module`: the most parameters one module holds directly
    (what ZeRO-3 gathers at a time)."""
    zero = zero or {}
    p, t = bytes_per_param, n_trained
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    shard = world if stage >= 1 else 1
    master = 4 * t if (p == 2 or stage >= 1) else 0  # a separate fp32 copy (ZeRO 1-3 keep one in fp32 too)
    optimizer = 0.0 if offload_optimizer else (master + 8 * t) / shard
    if stage == 3:
        weights = 0.0 if offload_param else n_params * p / world
        live = int(zero.get("stage3_max_live_parameters", 1e9)) + int(zero.get("stage3_prefetch_bucket_size", 5e7))
        block = largest_module or n_params
        # gathered in full while a module runs: that module and the one prefetched behind it, within the caps
        weights += min(n_params, 2 * block, live) * p * (world - 1) / world if world > 1 else 0
    else:
        weights = n_params * p
    if stage >= 2:
        gradients = (4 * t / world) + (0 if stage == 2 else t * p / world)
    else:
        gradients = t * p + (4 * t / shard if stage == 1 else 0)
    bucket = min(t, int(zero.get("reduce_bucket_size", 5e8))) * p if stage >= 1 and world > 1 else 0
    return ModelStates(weights, gradients, optimizer, bucket,
                       {"offload_optimizer": offload_optimizer, "offload_param": offload_param, "sharded_over": shard})


def count_parameters(config, adapter, model_config) -> tuple[int, int, object]:
    """(all parameters, trained ones, the meta-device model) under the run's trainable flags and LoRA."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .lora import apply_lora
    from .model_loading import set_trainable

    with torch.device("meta"), no_zero3_init():
        model = AutoModelForImageTextToText.from_config(copy.deepcopy(config))
    set_trainable(model, adapter, model_config)
    if model_config.lora_rank:
        model, _ = apply_lora(model, adapter, model_config)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), model


def largest_module(model) -> int:
    """The most parameters a single module holds itself (ZeRO-3 gathers module by module)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


PLAN_CACHE_VERSION = 1


def startup_line(config, loaded, ds_config: dict, world: int, checks, encoder) -> str:
    """`_startup_line`, never stopping a run: a model it cannot trace says so in the line; its random draws
    are undone (rank 0's draws, LoRA dropout among them, stay the run's own)."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            return _startup_line(config, loaded, ds_config, world, checks, encoder)
    except Exception as err:  # noqa: BLE001 - a forecast must never stop a run
        return f"plan: could not trace this model ({type(err).__name__}: {str(err).splitlines()[0][:160]})"


def _startup_line(config, loaded, ds_config: dict, world: int, checks, encoder) -> str:
    """The trainer's one-line plan at start (rank 0): model states from the loaded model's own parameters and
    DeepSpeed's partitioning, the activations of this data's worst micro-batch traced on fake tensors (cached
    in the data cache, keyed by the model config, the trainable flags, the batch and the worst sample's
    counts, so a restart pays nothing), against the GPU's memory. A run on a CPU states the peak only."""
    import hashlib
    from dataclasses import asdict

    import torch

    from .data.cache import cache_root, writable
    from .data.preflight import OK

    model, adapter = loaded.model, loaded.adapter
    zero = ds_config["zero_optimization"]
    stage, bf16 = zero.get("stage", 0), ds_config["bf16"]["enabled"]
    params = list(model.parameters())
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)  # ZeRO-3: the full sizes
    n_trained = sum(int(getattr(p, "ds_numel", p.numel())) for p in params if p.requires_grad)
    block = max((sum(int(getattr(p, "ds_numel", p.numel())) for p in m.parameters(recurse=False))
                 for m in model.modules()), default=0)
    states = model_states(n_params, n_trained, stage, world, 2 if bf16 else 4, zero, block)
    ok = checks.kind == OK
    longest = int(checks.n_tokens[ok].max()) if ok.any() else config.data.max_length
    most_image = int(checks.n_image_tokens[ok].max()) if ok.any() else 0
    batch, sp = config.batch, config.parallel.sequence_parallel
    key = hashlib.sha256(json.dumps([PLAN_CACHE_VERSION, model.config.to_json_string(), asdict(config.model),
                                     batch.micro_batch_size, batch.max_tokens_per_batch, batch.packing, longest,
                                     most_image, sp, bf16], sort_keys=True, default=str).encode()).hexdigest()[:24]
    root = writable(cache_root(config.data.data_cache))
    path = root / "plan" / f"{key}.json" if root is not None else None
    if path is not None and path.exists():
        activations = json.loads(path.read_text())["activations"]
    else:
        micro = worst_micro_batch(encoder, adapter, model.config, batch, sp, longest, most_image)
        activations = trace_activations(config.model.path, model.config, config.model, adapter, "sdpa", micro,
                                        torch.bfloat16 if bf16 else torch.float32).peak / max(1, sp)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"activations": activations}))
    peak = states.total + activations
    said = (f"plan: predicted peak {_bytes(peak)} a rank (model states {_bytes(states.total)}, activations "
            f"{_bytes(activations)} for a micro-batch of the longest sample, {longest} tokens)")
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        fits = peak + MARGIN * memory <= memory
        said += (f" of {memory / 1e9:.1f} GB: " + ("fits" if fits else "WILL NOT FIT: see `python -m ds_vlm.plan` "
                                                    "for what would (ZeRO-3, sequence parallelism, a smaller "
                                                    "--max_tokens_per_batch)"))
    else:
        said += "; on a CPU, no GPU memory to compare"
    return said


def main(argv=None) -> int:
    report = plan(argv)
    if report is None:
        return 2
    print(render(report))
    return 0 if report["fits"] else 1


def _extra(parser) -> None:
    parser.add_argument("--world_size", type=int, default=1, help="all ranks over all nodes")
    parser.add_argument("--gpu", default="h100-80gb", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--gpu_memory_gb", type=float, default=0.0, help="the GPU's memory (GB of 1e9 bytes), "
                                                                          "instead of --gpu's")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation the step time "
                                                                        "assumes")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="the machine planned for: cuda (bf16, flash/varlen attention) or cpu (fp32, sdpa)")
    parser.add_argument("--out", default="", help="write the plan as JSON here")


def plan(argv=None) -> Optional[dict]:
    import torch
    from transformers import AutoConfig, AutoProcessor

    from .config import ConfigError, load_tool_config
    from .data.encode import encoder_for
    from .ds_config import resolve_ds_config
    from .metrics import FlopsCounter
    from .models import adapter_for

    try:
        config, extra = load_tool_config(argv, _extra, needs_data=False)
        if not config.parallel.deepspeed:
            raise ConfigError("--deepspeed: the ZeRO json to plan for (ds_configs/zero2.json, ...)")
        if extra["gpu"] not in GPUS and not extra["gpu_memory_gb"]:
            raise ConfigError(f"--gpu {extra['gpu']!r}: one of {', '.join(GPUS)}, or give --gpu_memory_gb")
        ds = resolve_ds_config(config, extra["world_size"])
    except (ConfigError, ValueError, OSError) as err:
        print(f"ds-vlm plan: error: {err}", file=sys.stderr)
        return None
    began = time.perf_counter()
    world, sp = extra["world_size"], config.parallel.sequence_parallel
    model_cfg = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    adapter = adapter_for(model_cfg.model_type)
    processor = AutoProcessor.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    encoder = encoder_for(processor, adapter, config.data)
    cuda = extra["device"] == "cuda"
    precision = 2 if cuda and config.model.precision != "fp32" else 4
    dtype = torch.bfloat16 if precision == 2 else torch.float32
    zero = ds["zero_optimization"]
    stage = zero.get("stage", 0)
    n_params, n_trained, meta_model = count_parameters(model_cfg, adapter, config.model)
    block = largest_module(meta_model)
    states = model_states(n_params, n_trained, stage, world, precision, zero, block)
    memory = extra["gpu_memory_gb"] * 1e9 if extra["gpu_memory_gb"] else GPUS[extra["gpu"]][0]
    peak_tflops = GPUS.get(extra["gpu"], (0, None))[1] if cuda else None

    # the worst micro-batch: from the data's preflight, else the flags
    longest, most_image = config.data.max_length, 0
    source = f"--max_length {config.data.max_length}"
    if config.data.train_data:
        from .data.preflight import OK, preflight
        from .data.sources import RecordIndex

        checks, _ = preflight(RecordIndex(config.data.train_data, config.data.image_root, config.data.data_format,
                                          config.data.data_cache), encoder, "cached", config.data.data_cache)
        ok = checks.kind == OK
        if ok.any():
            longest, most_image = int(checks.n_tokens[ok].max()), int(checks.n_image_tokens[ok].max())
            source = f"{config.data.train_data}: longest sample {longest} tokens, most image tokens {most_image}"
    if not most_image:
        largest = getattr(processor.image_processor, "max_pixels", None) or (
            processor.image_processor.size.get("longest_edge", 448) ** 2 if hasattr(processor.image_processor, "size")
            and isinstance(processor.image_processor.size, dict) else 448 * 448)
        image_processor = processor.image_processor
        patch = getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 1)
        most_image = min(longest // 2, int(largest // (patch * patch)))
    micro = worst_micro_batch(encoder, adapter, model_cfg, config.batch, sp, longest, most_image)
    act = trace_activations(config.model.path, model_cfg, config.model, adapter, "sdpa", micro, dtype)
    margin = MARGIN * memory
    peak = states.total + act.peak / max(1, sp)
    fits = peak + margin <= memory
    per_token = act.peak / max(1, sp) / max(1, act.tokens)  # per rank: sequence parallelism splits each row
    free = memory - margin - states.total
    best = int(free / per_token) if per_token > 0 and free > 0 else 0
    flops_counter = FlopsCounter(meta_model, adapter, config.model)
    from .loss import LabelRows

    flops = flops_counter(micro.inputs, len(LabelRows.from_labels(micro.labels)), micro.sample_lengths)
    steps_micro = config.batch.grad_accum
    step_flops = flops * steps_micro  # per rank
    step_s = step_flops / (extra["mfu"] * peak_tflops * 1e12) if peak_tflops else None
    report = {
        "command": "python -m ds_vlm.plan " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": config.model.path, "world_size": world, "sequence_parallel": sp, "zero_stage": stage,
        "precision": "bf16" if precision == 2 else "fp32", "gpu": extra["gpu"], "gpu_memory_gb": memory / 1e9,
        "parameters": n_params, "trained_parameters": n_trained,
        "per_rank_gb": {"weights": states.weights / 1e9, "gradients": states.gradients / 1e9,
                        "optimizer_states": states.optimizer / 1e9, "zero_buffers": states.buckets / 1e9,
                        "activations": act.peak / max(1, sp) / 1e9, "allocator_margin": margin / 1e9},
        "worst_micro_batch": {"tokens": act.tokens, "image_tokens": act.image_tokens, "from": source},
        "peak_gb_per_rank": peak / 1e9, "fits": fits,
        "max_tokens_per_batch_that_fits": best,
        "step_flops_per_rank": step_flops, "mfu_assumed": extra["mfu"] if peak_tflops else None,
        "step_time_s": step_s, "tokens_per_s": (act.tokens * world / max(1, sp) / step_s) if step_s else None,
        "seconds_to_plan": round(time.perf_counter() - began, 1),
    }
    if not fits:
        report["would_fit"] = alternatives(n_params, n_trained, stage, world, precision, zero, act, memory, margin, sp,
                                           block)
    if extra["out"]:
        with open(extra["out"], "w") as f:
            json.dump(report, f, indent=2)
    return report


def alternatives(n_params, n_trained, stage, world, precision, zero, act, memory, margin, sp, block) -> list[dict]:
    """What would fit instead, each with its predicted peak (GB)."""
    out = []
    for name, st, z, shrink in (("ZeRO-3", 3, zero, 1), ("sequence parallel 2", stage, zero, 2 * max(1, sp)),
                                ("optimizer offloaded to the CPU", stage,
                                 {**zero, "offload_optimizer": {"device": "cpu"}}, 1)):
        if name == "ZeRO-3" and stage == 3:
            continue
        states = model_states(n_params, n_trained, st, world, precision, z, block)
        peak = states.total + act.peak / shrink
        out.append({"change": name, "peak_gb_per_rank": peak / 1e9, "fits": peak + margin <= memory})
    states = model_states(n_params, n_trained, stage, world, precision, zero, block)
    free = memory - margin - states.total
    if free > 0 and act.peak > free * max(1, sp):
        tokens = int(act.tokens * free * max(1, sp) / act.peak)
        out.append({"change": f"--max_tokens_per_batch {tokens}", "peak_gb_per_rank": (states.total + free) / 1e9,
                    "fits": True})
    return out


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render(report: dict) -> str:
    parts = report["per_rank_gb"]
    lines = [f"{report['model']}: {_count(report['parameters'])} parameters, {_count(report['trained_parameters'])} "
             f"trained; ZeRO-{report['zero_stage']} over {report['world_size']} ranks, {report['precision']}, "
             f"{report['gpu']} ({report['gpu_memory_gb']:.1f} GB)",
             f"worst micro-batch: {report['worst_micro_batch']['tokens']} tokens, "
             f"{report['worst_micro_batch']['image_tokens']} image tokens ({report['worst_micro_batch']['from']})",
             "per rank (GB):"]
    lines += [f"  {name.replace('_', ' '):<18} {value:10.4f}" for name, value in parts.items()]
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines.append(f"  {'peak (allocated)':<18} {report['peak_gb_per_rank']:10.4f}  of {report['gpu_memory_gb']:.1f} GB: "
                 f"{verdict}")
    lines.append(f"largest --max_tokens_per_batch that fits: {report['max_tokens_per_batch_that_fits']}")
    if report["step_time_s"]:
        lines.append(f"step: {report['step_flops_per_rank'] / 1e12:.1f} TFLOP per rank, {report['step_time_s']:.2f} s "
                     f"and {report['tokens_per_s']:.0f} tokens/s at an assumed MFU of {report['mfu_assumed']:.0%}")
    for alt in report.get("would_fit", []):
        lines.append(f"  instead: {alt['change']}: {alt['peak_gb_per_rank']:.2f} GB"
                     f" ({'fits' if alt['fits'] else 'does not fit'})")
    lines.append(f"planned in {report['seconds_to_plan']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
