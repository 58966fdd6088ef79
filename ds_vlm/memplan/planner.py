"""Know before you launch: each GPU's peak memory and the step time of a run, from the model's config alone.

    python -m ds_vlm.plan --model Qwen/Qwen3-VL-2B-Instruct --deepspeed ds_configs/zero3.json --world_size 8 \\
        --gpu h100-80gb [--train_data D] [--max_tokens_per_batch 65536 --packing] [--out plan.json]

The trainer's own flags and --config (same parser, same validation), plus --world_size (all ranks over all
nodes), --gpu NAME (GPUS below) or --gpu_memory_gb G, --mfu (the step time's assumption), --out.

How (execute, don't guess):
- Model states from DeepSpeed's partitioning over the data-parallel ranks (`model_states`): the weights in
  the run's precision (QLoRA's 4-bit ones at their stored bytes; 1/N of them under ZeRO-3), gradients (bf16
  ones while they are reduced; ZeRO-2/3 keep 1/N in fp32), the optimizer's fp32 master copy and AdamW's two
  moments (1/N from ZeRO-1 on; none on the GPU with `offload_optimizer`), ZeRO's reduce bucket and, under
  ZeRO-3, the gathered live parameters
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

import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from ds_vlm.memplan.trace import largest_image_tokens, meta_model, trace_activations, worst_counts, worst_micro_batch

GIB = 1 << 30
# name: memory as torch reports it (the dense bf16 peak comes from metrics.PEAK_TFLOPS, the table MFU uses)
GPUS = {"h100-80gb": 80 * GIB, "h200": 140 * GIB, "h800": 80 * GIB, "a100-80gb": 80 * GIB, "a100-40gb": 40 * GIB,
        "a800-80gb": 80 * GIB, "l40s": 48 * GIB, "l40": 48 * GIB, "a6000": 48 * GIB, "a10g": 24 * GIB,
        "l4": 24 * GIB, "4090": 24 * GIB, "v100-32gb": 32 * GIB}
DEFAULT_MFU = 0.35  # an assumption, stated in the output: a dense 2B-8B fine-tune on H100s reaches 30-45%
MARGIN = 0.10       # the allocator's fragmentation and CUDA context, as a share of the GPU


@dataclass
class ModelStates:
    weights: float
    gradients: float
    optimizer: float
    buckets: float
    detail: dict = field(default_factory=dict)
    whole_grads: float = 0.0  # of `gradients`, the parameters' own .grad kept whole through the backward (ZeRO 0/1)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buckets


def model_states(n_params: int, n_trained: int, stage: int, world: int, bytes_per_param: int,
                 zero: Optional[dict] = None, largest_module: int = 0, persistent: int = 0,
                 largest_trained: int = 0, muon_trained: int = 0, experts: int = 0, ep: int = 1) -> ModelStates:
    """Per-rank bytes of weights, gradients, optimizer states and ZeRO's buffers (see the module docstring).
    `bytes_per_param`: 2 in bf16, 4 in fp32; `largest_module`: the most parameters one module holds directly
    (what ZeRO-3 gathers at a time); `persistent`: the parameters ZeRO-3 keeps whole on every rank (those under
    `stage3_param_persistence_threshold`: `persistent_numel`); `largest_trained`: the largest trained parameter
    (ZeRO-1/2 reduce its gradient through a copy); `muon_trained`: the trained parameters DeepSpeed's Muon
    updates (one momentum each in the gradients' dtype instead of AdamW's two fp32 moments; ZeRO-1/2 stage the
    step's momentum in a second buffer). ZeRO++'s hpZ (`zero_hpz_partition_size` h > 1) keeps a secondary copy
    of the weights, partitioned over the h ranks of a node (int8 with `zero_quantized_weights`). Expert
    parallelism (`ep` > 1, AutoEP; `experts`: the MoE experts' parameters) leaves each rank its 1/ep of the
    experts, whose ZeRO partitions then span the world / ep ranks that hold the same experts: the same 1/world
    of their gradients and optimizer states, but 1/ep of their weights where ZeRO-0/1/2 keep weights whole."""
    zero = zero or {}
    p, t = bytes_per_param, n_trained
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    shard = world if stage >= 1 else 1
    master = 4 * t if (p == 2 or stage >= 1) else 0  # a separate fp32 copy (ZeRO 1-3 keep one in fp32 too)
    momentum = p * muon_trained * (2 if stage in (1, 2) else 1)
    optimizer = 0.0 if offload_optimizer else (master + 8 * (t - muon_trained) + momentum) / shard
    if stage == 3:
        weights = 0.0 if offload_param else ((n_params - persistent) / world + persistent) * p
        live = int(zero.get("stage3_max_live_parameters", 1e9)) + int(zero.get("stage3_prefetch_bucket_size", 5e7))
        block = largest_module or n_params
        # gathered in full while a module runs: that module and the one prefetched behind it, within the caps
        # (a new full-size tensor each: the rank's own partition stays where it is)
        weights += min(n_params, 2 * block, live) * p if world > 1 else 0
        hpz = int(zero.get("zero_hpz_partition_size", 1))
        if hpz > 1 and not offload_param:
            weights += (n_params - persistent) / hpz * (1 if zero.get("zero_quantized_weights") else p)
    else:
        weights = (n_params - experts + experts / ep) * p
    if stage >= 2:
        gradients = (4 * t / world) + (0 if stage == 2 else t * p / world)
    else:
        gradients = t * p + (4 * t / shard if stage == 1 else 0)
    # ZeRO's gradient buckets, allocated whole whatever the model's size: ZeRO-1/2 at each backward's start (a
    # second one with overlap_comm, off by default there), ZeRO-3 once (overlap_comm on by default)
    bucket = 0
    if stage >= 1 and zero.get("contiguous_gradients", True) and t:
        overlap = zero.get("overlap_comm", stage == 3)
        bucket = int(zero.get("reduce_bucket_size", 5e8)) * p * (2 if overlap and stage < 3 else 1)
    return ModelStates(weights, gradients, optimizer, bucket,
                       {"offload_optimizer": offload_optimizer, "offload_param": offload_param, "sharded_over": shard,
                        "reduce_at_first_grad": stage in (1, 2), "world": world,
                        "largest_param_bytes": largest_trained * p},
                       whole_grads=t * p if stage <= 1 else 0.0)


def step_peak(states: ModelStates, act) -> float:
    """The step's busiest moment on a rank: the model states plus the traced activations, with the gradients
    as the ZeRO stage holds them (`act`: one rank's trace, its slice under sequence parallelism). Under ZeRO 0/1
    the parameters' gradients grow through the backward while activations are freed, so the trace's own peak
    with the gradients in it (`peak_with_grads`) stands for both. Under ZeRO 2/3 each gradient lives from its
    making until its parameter is accumulated and moved into ZeRO's buffers (`peak_moved_grads`; the buffers
    are model states)."""
    summed = states.total + act.peak
    if states.whole_grads and act.peak_with_grads:
        return min(summed, states.total - states.whole_grads + act.peak_with_grads)
    if not states.whole_grads and act.peak_moved_grads:
        def extra(peak: float) -> float:  # the transient gradients beyond the activations' own peak
            return max(0.0, peak - act.peak)

        if states.detail.get("reduce_at_first_grad") and act.moved_from_first_grad:
            # ZeRO-1/2 allocate their buckets and gradient partitions at the first gradient (a peak before it
            # has neither: the backward's start without checkpointing), and reduce the largest gradient through
            # a copy of its partition (the peak of a big tied embedding's step)
            before = summed - states.buckets - states.gradients + extra(act.moved_before_first_grad)
            after = summed + extra(act.moved_from_first_grad)
            largest = states.detail.get("largest_param_bytes", 0.0)
            reducing = states.total + largest * (1 + 1 / states.detail.get("world", 1))
            return max(before, after, reducing)
        return summed + extra(act.peak_moved_grads)
    return summed


@dataclass
class ParamCounts:
    """What the model states need of a model: each parameter's size (ZeRO-3's partitioned ones by their full
    size, 4-bit ones by their real number of weights), which train, the most one module holds itself (ZeRO-3
    gathers module by module), and QLoRA's 4-bit weights: how many, and the bytes they take as stored."""

    sizes: list[int]
    n_trained: int
    largest_trained: int
    largest_module: int
    n_quantized: int = 0
    quantized_bytes: int = 0
    n_muon: int = 0  # of the trained parameters, those DeepSpeed's Muon updates (a Muon run's)
    n_experts: int = 0  # the MoE experts' parameters (names with `.experts.`)
    ep: int = 1  # expert parallelism (AutoEP's autoep_size)

    @classmethod
    def of(cls, model, four_bit=(), muon: bool = False, ep: int = 1) -> "ParamCounts":
        """`four_bit`: parameters of a model not quantized (the planner's, on the meta device) that --lora_bits 4
        would load in 4 bits (four_bit_params), at the bytes bitsandbytes would store them in (nf4_bytes); `muon`:
        the run's optimizer is DeepSpeed's Muon; `ep`: its expert-parallel size."""
        from ds_vlm.runtime.flops import weight_count

        params = list(model.parameters())
        trained = [weight_count(p) for p in params if p.requires_grad]
        block = max((sum(weight_count(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
        planned = {id(p) for p in four_bit}
        quantized = [p for p in params if getattr(p, "quant_state", None) is not None]
        planned_only = [p for p in params if id(p) in planned and getattr(p, "quant_state", None) is None]
        stored = sum(map(stored_bytes, quantized)) + sum(nf4_bytes(weight_count(p)) for p in planned_only)
        n_muon = 0
        if muon:
            from ds_vlm.train.optim import muon_flags

            flags = muon_flags(model)
            n_muon = sum(weight_count(p) for name, p in model.named_parameters() if flags[name] and p.requires_grad)
        experts = sum(weight_count(p) for name, p in model.named_parameters() if ".experts." in name)
        return cls([weight_count(p) for p in params], sum(trained), max(trained, default=0), block,
                   sum(map(weight_count, quantized + planned_only)), stored, n_muon, experts, ep)

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def states(self, stage: int, world: int, bytes_per_param: int, zero: dict) -> ModelStates:
        """`model_states` of these parameters (persistence by `zero`'s own stage); 4-bit weights by their stored
        bytes (never partitioned: ZeRO-3 refuses them)."""
        states = model_states(self.n_params - self.n_quantized, self.n_trained, stage, world, bytes_per_param, zero,
                              self.largest_module, persistent_numel(self.sizes, zero), self.largest_trained,
                              self.n_muon, self.n_experts, self.ep)
        states.weights += self.quantized_bytes
        return states


def stored_bytes(param) -> int:
    """A 4-bit parameter's bytes: its packed weights (two a byte) and its quantization state's tensors (block
    scales, and with double quantization their own scales and code tables)."""
    import torch

    total, state = param.numel() * param.element_size(), param.quant_state
    while state is not None:
        total += sum(v.numel() * v.element_size() for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    return total


def nf4_bytes(n: int) -> int:
    """The bytes bitsandbytes stores n weights in as 4-bit NF4 with double quantization (QLoRA's): two weights a
    byte, a uint8 scale per block of 64, an fp32 scale per 256 of those, the NF4 code (16 fp32), the scales'
    code (256 fp32) and an fp32 offset (stored_bytes of a real one)."""
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256 + 1)


def four_bit_params(model, adapter) -> list:
    """The weights --lora_bits 4 loads in 4 bits, found on a model that is not quantized: the language tower's
    linear layers, LoRA's own adapters aside (model_loading.full_precision_modules keeps the rest)."""
    import torch

    head = model.get_output_embeddings()
    return [module.weight for root in adapter.parts(model).llm for name, module in root.named_modules()
            if type(module) is torch.nn.Linear and module is not head and not _LORA.search(name)]


_LORA = re.compile(r"(^|\.)lora_[AB](\.|$)")


def persistent_numel(sizes, zero: dict) -> int:
    """Of the parameter sizes `sizes`, how many elements ZeRO-3 keeps whole on every rank rather than
    partitioned (each parameter under `stage3_param_persistence_threshold`, 1e5 by default)."""
    threshold = int(zero.get("stage3_param_persistence_threshold", 1e5))
    return sum(n for n in sizes if n < threshold) if zero.get("stage", 0) == 3 else 0


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
    parser.add_argument("--mfu", type=float, default=0.0,
                        help=f"model FLOPs utilisation the step time assumes (default: --gpu_check's, else "
                             f"{DEFAULT_MFU})")
    parser.add_argument("--gpu_check", default="", help="a `launch/gpu_check.sh --out` JSON: the MFU its sweep "
                                                        "measured at the size nearest this plan's micro-batch")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="the machine planned for: cuda (bf16, flash/varlen attention) or cpu (fp32, sdpa)")
    parser.add_argument("--out", default="", help="write the plan as JSON here")


def plan(argv=None) -> Optional[dict]:
    import torch
    from transformers import AutoProcessor

    from ds_vlm.config import AUTO_BUDGET, ConfigError
    from ds_vlm.data.encode import encoder_for
    from ds_vlm.flags import load_tool_config
    from ds_vlm.models import adapter_for, model_config
    from ds_vlm.parallel.expert import ep_size_of
    from ds_vlm.runtime.flops import FlopsCounter, peak_tflops_of
    from ds_vlm.train.ds_config import resolve_ds_config

    try:
        config, extra = load_tool_config(argv, _extra, needs_data=False)
        if not config.parallel.deepspeed:
            raise ConfigError("--deepspeed: the ZeRO json to plan for (ds_configs/zero2.json, ...)")
        if extra["gpu"] not in GPUS and not extra["gpu_memory_gb"]:
            raise ConfigError(f"--gpu {extra['gpu']!r}: one of {', '.join(GPUS)}, or give --gpu_memory_gb")
        ds = resolve_ds_config(config, extra["world_size"])
        if config.batch.max_tokens_per_batch == AUTO_BUDGET:  # planned as --micro_batch_size; the fit reported
            config.batch.max_tokens_per_batch = 0
        began = time.perf_counter()
        model_cfg = model_config(config.model.path, config.model.trust_remote_code)
        adapter = adapter_for(model_cfg.model_type)
        refusal = adapter.packing_refusal(model_cfg) if config.batch.packing else ""
        if refusal:
            raise ConfigError(f"--packing: {refusal}")
        meta, _ = meta_model(model_cfg, adapter, config.model)  # the generic adapter refuses here what it cannot do
        processor = AutoProcessor.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
        encoder = encoder_for(processor, adapter, config.data)
    except (ConfigError, ValueError, OSError) as err:
        print(f"ds-vlm plan: error: {err}", file=sys.stderr)
        return None
    world, sp = extra["world_size"], config.parallel.sequence_parallel
    cuda = extra["device"] == "cuda"
    precision = 2 if cuda and config.model.precision != "fp32" else 4
    dtype = torch.bfloat16 if precision == 2 else torch.float32
    zero = ds["zero_optimization"]
    stage = zero.get("stage", 0)
    counts = ParamCounts.of(meta, four_bit_params(meta, adapter) if config.model.lora_bits else (),
                            muon=ds["optimizer"]["type"] == "Muon", ep=ep_size_of(ds))
    states = counts.states(stage, world, precision, zero)
    memory = extra["gpu_memory_gb"] * 1e9 if extra["gpu_memory_gb"] else GPUS[extra["gpu"]]
    peak_tflops = peak_tflops_of(extra["gpu"]) if cuda and extra["gpu"] in GPUS else None

    # the worst micro-batch: from the data's preflight, else the flags
    longest, most_image = config.data.max_length, 0
    source = f"--max_length {config.data.max_length}"
    if config.data.train_data:
        from ds_vlm.data.preflight import OK, preflight
        from ds_vlm.data.sources import RecordIndex

        checks, _ = preflight(RecordIndex(config.data.train_data, config.data.image_root, config.data.data_format,
                                          config.data.data_cache, config.data.caption_prompt), encoder, "cached",
                              config.data.data_cache)
        if (checks.kind == OK).any():
            longest, most_image = worst_counts(checks, longest)
            source = f"{config.data.train_data}: longest sample {longest} tokens, most image tokens {most_image}"
    if not most_image:
        most_image = min(longest // 2, largest_image_tokens(processor.image_processor))
    micro = worst_micro_batch(encoder, adapter, model_cfg, config.batch, sp, longest, most_image)
    act = trace_activations(model_cfg, config.model, adapter, micro, dtype, sp)
    margin = MARGIN * memory
    peak = step_peak(states, act)
    fits = peak + margin <= memory
    per_token = act.peak / max(1, act.tokens)  # per rank: sequence parallelism splits each row
    free = memory - margin - states.total
    best = int(free / per_token) if per_token > 0 and free > 0 else 0
    flops_counter = FlopsCounter(meta, adapter, config.model)
    from ds_vlm.train.loss import LabelRows

    flops = flops_counter(micro.inputs, len(LabelRows.from_labels(micro.labels)), micro.sample_lengths)
    # per rank: a sequence-parallel group shares its micro-batches, each rank computing 1/sp of them
    step_flops = flops * config.batch.grad_accum / max(1, sp)
    mfu, mfu_from = mfu_to_assume(extra["mfu"], extra["gpu_check"], act.tokens)
    step_s = step_flops / (mfu * peak_tflops * 1e12) if peak_tflops else None
    report = {
        "command": "python -m ds_vlm.plan " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": config.model.path, "world_size": world, "sequence_parallel": sp, "zero_stage": stage,
        "precision": "bf16" if precision == 2 else "fp32", "gpu": extra["gpu"], "gpu_memory_gb": memory / 1e9,
        "parameters": counts.n_params, "trained_parameters": counts.n_trained,
        "per_rank_gb": {"weights": states.weights / 1e9, "gradients": states.gradients / 1e9,
                        "optimizer_states": states.optimizer / 1e9, "zero_buffers": states.buckets / 1e9,
                        "activations": (peak - states.total) / 1e9, "allocator_margin": margin / 1e9},
        "activations_by_part_gb": {k: v / 1e9
                                   for k, v in sorted(act.by_part.items(), key=lambda kv: -kv[1])},
        "worst_micro_batch": {"tokens": act.tokens, "image_tokens": act.image_tokens, "from": source},
        "peak_gb_per_rank": peak / 1e9, "fits": fits,
        "max_tokens_per_batch_that_fits": best,
        "step_flops_per_rank": step_flops, "mfu_assumed": mfu if peak_tflops else None, "mfu_from": mfu_from,
        "step_time_s": step_s, "tokens_per_s": (act.tokens * config.batch.grad_accum * world / max(1, sp) / step_s)
        if step_s else None,
        "seconds_to_plan": round(time.perf_counter() - began, 1),
    }
    if not fits:
        report["would_fit"] = alternatives(counts, states, stage, world, precision, zero, act, memory, margin, sp)
    if extra["out"]:
        with open(extra["out"], "w") as f:
            json.dump(report, f, indent=2)
    return report


def mfu_to_assume(given: float, gpu_check: str, tokens: int) -> tuple[float, str]:
    """(MFU, where it comes from): --mfu; else the GPU check's sweep (`gpu_check.sh --out`), its measured MFU
    at the size nearest `tokens`; else DEFAULT_MFU, an assumption."""
    if given:
        return given, "--mfu"
    if gpu_check:
        with open(gpu_check) as f:
            stages = {s["name"]: s for s in json.load(f).get("stages", [])}
        rows = [r for r in stages.get("sweep_2b", {}).get("detail", {}).get("rows", [])
                if r.get("status") == "ok" and r.get("mfu")]
        if rows:
            near = min(rows, key=lambda r: abs(r["tokens"] - tokens))
            return near["mfu"], f"measured by {gpu_check} at {near['tokens']} tokens"
        return DEFAULT_MFU, f"assumed: {gpu_check} has no measured MFU"
    return DEFAULT_MFU, "assumed: no --gpu_check measurement given"


def alternatives(counts: ParamCounts, states: ModelStates, stage, world, precision, zero, act, memory, margin,
                 sp) -> list[dict]:
    """What would fit instead, each with its predicted peak (GB); `states`: the plan's own."""
    out = []
    for name, st, z, shrink in (("ZeRO-3", 3, zero, 1), (f"sequence parallel {2 * max(1, sp)}", stage, zero, 2),
                                ("optimizer offloaded to the CPU", stage,
                                 {**zero, "offload_optimizer": {"device": "cpu"}}, 1)):
        if name == "ZeRO-3" and stage == 3:
            continue
        peak = counts.states(st, world, precision, z).total + act.peak / shrink
        out.append({"change": name, "peak_gb_per_rank": peak / 1e9, "fits": peak + margin <= memory})
    free = memory - margin - states.total
    if free > 0 and act.peak > free:
        tokens = int(act.tokens * free / act.peak)
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
    by_part = report.get("activations_by_part_gb") or {}
    if by_part:
        lines.append("  (the traced activations at their peak, by what made them: "
                     + ", ".join(f"{name} {value:.4f}" for name, value in by_part.items()) + ")")
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines.append(f"  {'peak (allocated)':<18} {report['peak_gb_per_rank']:10.4f}  of {report['gpu_memory_gb']:.1f} GB: "
                 f"{verdict}")
    lines.append(f"largest --max_tokens_per_batch that fits: {report['max_tokens_per_batch_that_fits']}")
    if report["step_time_s"]:
        lines.append(f"step: {report['step_flops_per_rank'] / 1e12:.1f} TFLOP per rank, {report['step_time_s']:.2f} s "
                     f"and {report['tokens_per_s']:.0f} tokens/s at an MFU of {report['mfu_assumed']:.0%} "
                     f"({report['mfu_from']})")
    for alt in report.get("would_fit", []):
        lines.append(f"  instead: {alt['change']}: {alt['peak_gb_per_rank']:.2f} GB"
                     f" ({'fits' if alt['fits'] else 'does not fit'})")
    lines.append(f"planned in {report['seconds_to_plan']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
