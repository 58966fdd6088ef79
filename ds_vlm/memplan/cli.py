"""Know before you launch: each GPU's peak memory and the step time of a run, from the model's config alone.

    python -m ds_vlm.plan --model Qwen/Qwen3-VL-2B-Instruct --deepspeed ds_configs/zero3.json --world_size 8 \\
        --gpu h100-80gb [--train_data D] [--max_tokens_per_batch 65536 --packing] [--out plan.json]

The trainer's own flags and --config (same parser, same validation), plus --world_size (all ranks over all
nodes), --gpu NAME (GPUS below) or --gpu_memory_gb G, --mfu (the step time's assumption), --out. How the plan is
made: ds_vlm/memplan/planner.py (model states) and trace.py (activations); this module is the command: its
flags, the report and how it is printed.

Printed: each part per rank, the total against the GPU (with an allocator margin), the largest budget that
fits, the step's FLOPs (the trainer's FlopsCounter) and its time and tokens/s at the stated MFU, and when it
does not fit, what would. `--out` writes it all; `peak_gb_per_rank` and `max_tokens_per_batch_that_fits`
keep their names.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from typing import Optional

from ds_vlm.memplan.planner import MARGIN, ParamCounts, alternatives, four_bit_params, step_peak
from ds_vlm.memplan.trace import largest_image_tokens, meta_model, trace_activations, worst_counts, worst_micro_batch

GIB = 1 << 30
# name: memory as torch reports it (the dense bf16 peak comes from flops.PEAK_TFLOPS, the table MFU uses)
GPUS = {"h100-80gb": 80 * GIB, "h200": 140 * GIB, "h800": 80 * GIB, "a100-80gb": 80 * GIB, "a100-40gb": 40 * GIB,
        "a800-80gb": 80 * GIB, "l40s": 48 * GIB, "l40": 48 * GIB, "a6000": 48 * GIB, "a10g": 24 * GIB,
        "l4": 24 * GIB, "4090": 24 * GIB, "v100-32gb": 32 * GIB}
DEFAULT_MFU = 0.35  # an assumption, stated in the output: a dense 2B-8B fine-tune on H100s reaches 30-45%


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
    from ds_vlm.runtime.flops import FlopsCounter, peak_tflops_of
    from ds_vlm.train.ds_config import DSSettings, resolve_ds_config

    try:
        config, extra = load_tool_config(argv, _extra, needs_data=False)
        if not config.parallel.deepspeed:
            raise ConfigError("--deepspeed: the ZeRO json to plan for (ds_configs/zero2.json, ...)")
        if extra["gpu"] not in GPUS and not extra["gpu_memory_gb"]:
            raise ConfigError(f"--gpu {extra['gpu']!r}: one of {', '.join(GPUS)}, or give --gpu_memory_gb")
        ds = DSSettings.of(resolve_ds_config(config, extra["world_size"]))
        batch = config.batch  # --max_tokens_per_batch auto: planned as --micro_batch_size; the fit reported
        if batch.max_tokens_per_batch == AUTO_BUDGET:
            batch = replace(batch, max_tokens_per_batch=0)
        began = time.perf_counter()
        model_cfg = model_config(config.model.path, config.model.trust_remote_code)
        adapter = adapter_for(model_cfg.model_type)
        refusal = adapter.packing_refusal(model_cfg) if batch.packing else ""
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
    precision = 2 if cuda and config.model.precision != "fp32" else 4  # the target's, not this machine's json's
    dtype = torch.bfloat16 if precision == 2 else torch.float32
    counts = ParamCounts.of(meta, four_bit_params(meta, adapter) if config.model.lora_bits else (),
                            muon=ds.muon, ep=ds.ep)
    states = counts.states(ds.stage, world, precision, ds.zero)
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
    micro = worst_micro_batch(encoder, adapter, model_cfg, batch, sp, longest, most_image)
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
    step_flops = flops * batch.grad_accum / max(1, sp)
    mfu, mfu_from = mfu_to_assume(extra["mfu"], extra["gpu_check"], act.tokens)
    step_s = step_flops / (mfu * peak_tflops * 1e12) if peak_tflops else None
    report = {
        "command": "python -m ds_vlm.plan " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": config.model.path, "world_size": world, "sequence_parallel": sp, "zero_stage": ds.stage,
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
        "step_time_s": step_s, "tokens_per_s": (act.tokens * batch.grad_accum * world / max(1, sp) / step_s)
        if step_s else None,
        "seconds_to_plan": round(time.perf_counter() - began, 1),
    }
    if not fits:
        report["would_fit"] = alternatives(counts, states, ds.stage, world, precision, ds.zero, act, memory, margin,
                                           sp)
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
