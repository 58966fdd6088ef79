"""The benchmark's report: the table, the targets and the machine it ran on."""

from __future__ import annotations

import os
import statistics

from benchmarks.padding import TOKEN_BUDGET_TARGET
from benchmarks.runner import BATCH_CASES, REFERENCE

LABELS = {"ds_zero0": "ds-vlm ZeRO-0", "ds_zero1": "ds-vlm ZeRO-1", "ds_zero2": "ds-vlm ZeRO-2",
          "ds_zero3": "ds-vlm ZeRO-3", "plain": "plain PyTorch, 1 process", "hf_zero0": "HF Trainer ZeRO-0",
          "hf_zero2": "HF Trainer ZeRO-2", "hf_zero3": "HF Trainer ZeRO-3", "batch_fixed": "fixed micro-batches",
          "batch_budget": "token budget, padded", "batch_packed": "token budget, packed"}
PACKED_EFFICIENCY_TARGET = 0.99


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _status(r: dict) -> str:
    return "ok" if r["status"].startswith("ok") else (r["status"] if r["status"] in ("refused", "timeout")
                                                     else "failed")


def render(report: dict) -> str:
    s = report["settings"]
    lines = [f"Training ({report['preset']} preset, {s['num_ranks']} ranks unless noted, micro-batch "
             f"{s['micro_batch_size']}/rank = global batch {s['micro_batch_size'] * s['num_ranks']}, {s['steps']} "
             f"steps, first {s['warmup']} dropped; rates from the median step time"
             + (f"; median of {s['repeats']} rounds" if s.get("repeats", 1) > 1 else "") + f"; {report['machine']})"]
    ref = report["cases"].get(REFERENCE, {}).get("samples_per_s")
    header = (f"{'case':<26}{'status':<10}{'samples/s':>10}{'tokens/s':>10}{'s/step':>8}{'vs HF Z2':>9}"
              f"{'TFLOP/s/rank':>13}{'peak RSS/rank GB':>18}{'wall s':>8}")
    lines += [header, "-" * len(header)]
    for case, r in report["cases"].items():
        if case in BATCH_CASES:
            continue
        status = _status(r)
        ratio = r.get("samples_per_s") / ref if ref and r.get("samples_per_s") else None
        rss = "/".join(f"{x:.2f}" for x in r.get("peak_rss_gb") or []) or "-"
        lines.append(f"{LABELS.get(case, case):<26}{status:<10}{_fmt(r.get('samples_per_s'), '.1f'):>10}"
                     f"{_fmt(r.get('tokens_per_s'), '.0f'):>10}{_fmt(r.get('s_per_step'), '.3f'):>8}"
                     f"{_fmt(ratio, '.2f'):>9}{_fmt(r.get('tflops_per_rank'), '.4f'):>13}{rss:>18}"
                     f"{_fmt(r.get('wall_s'), '.0f'):>8}")
    for case, r in report["cases"].items():
        if not r["status"].startswith("ok"):
            lines.append(f"  {LABELS.get(case, case)}: {r['status']}: "
                         f"{r.get('reason') or ' | '.join(r.get('log_tail', [])[-3:])}")
        for failed in r.get("rounds_failed", []):
            lines.append(f"  {LABELS.get(case, case)}, round {failed['round']}: {failed['status']}"
                         + ("" if failed["status"].startswith("ok") else " (not measured; see the JSON's log tail)"))
    p = report.get("padding")
    if p:
        lg = p["lengths"]
        lines += ["", f"Padding, no training: {p['records']} varied-length records (tokens per sample: "
                      f"min {lg['min']}, "
                      f"median {lg['median']}, mean {lg['mean']:.0f}, p90 {lg['p90']}, max {lg['max']}; "
                      f"real encoder), one epoch, {p['world_size']} ranks",
                  f"{'plan':<38}{'micro-batches':>14}{'samples/mb':>11}{'real tok':>10}{'computed tok':>13}"
                  f"{'efficiency':>11}{'vs fixed':>9}"]
        for name, key in ((f"fixed, micro-batch {p['micro_batch_size']}", "fixed"),
                          (f"token budget {p['max_tokens_per_batch']}", "token_budget"),
                          (f"token budget {p['max_tokens_per_batch']}, packed", "packed")):
            q = p[key]
            lines.append(f"{name:<38}{q['micro_batches']:>14}{q['mean_samples_per_micro_batch']:>11.1f}"
                         f"{q['real_tokens']:>10}{q['computed_tokens']:>13}{q['padding_efficiency']:>11.1%}"
                         f"{q['computed_tokens'] / p['fixed']['computed_tokens']:>9.2f}")
    batch = {case: r for case, r in report["cases"].items() if case in BATCH_CASES}
    if batch:
        lines += ["", "The same varied-length data, trained (ds-vlm ZeRO-2, same steps; each step's real tokens / its "
                  "time, median over the steps; a packed step holds more samples than a padded one)",
                  f"{'batches':<26}{'status':<10}{'s/step':>8}{'computed tok/step':>18}{'real tok/s':>11}"
                  f"{'efficiency':>11}{'rounds real tok/s':>24}{'rounds s/step':>20}"]
        for case, r in batch.items():
            rounds = "/".join(_fmt(x, ".3f") for x in r.get("rounds_s_per_step", [r.get("s_per_step")]))
            rates = "/".join(_fmt(x, ".0f") for x in r.get("rounds_step_tokens_per_s", [r.get("step_tokens_per_s")]))
            lines.append(f"{LABELS[case]:<26}{_status(r):<10}{_fmt(r.get('s_per_step'), '.3f'):>8}"
                         f"{_fmt(r.get('computed_tokens_per_step'), '.0f'):>18}"
                         f"{_fmt(r.get('step_tokens_per_s'), '.0f'):>11}{_fmt(r.get('padding_efficiency'), '.1%'):>11}"
                         f"{rates:>24}{rounds:>20}")
    if report.get("loss_memory"):
        from benchmarks import loss_memory

        lines += ["", loss_memory.render(report["loss_memory"])]
    lines += ["", "Targets:"]
    for target in report["targets"].values():
        verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[target["met"]]
        lines.append(f"  [{verdict}] {target['what']}: {target['measured']}")
    return "\n".join(lines)


ENGINE_MEDIAN_TARGET, ENGINE_ROUND_FLOOR = 1.0, 0.95


def engine_target(report: dict, stage: int) -> dict:
    """ds-vlm against the Trainer on ZeRO-`stage`: each round's speed ratio (the Trainer's s/step over ours,
    from the same round: taking turns, or back to back), their median and spread. Met: median >= 1.0x and no
    round below 0.95x."""
    ours, hf = report["cases"].get(f"ds_zero{stage}", {}), report["cases"].get(f"hf_zero{stage}", {})
    what = (f"ds-vlm ZeRO-{stage} step no slower than the transformers Trainer's on the same json: median of the "
            f"rounds' ratios >= {ENGINE_MEDIAN_TARGET:.2f}x, no round below {ENGINE_ROUND_FLOOR:.2f}x")
    if not (ours.get("s_per_step") and hf.get("s_per_step")):
        return {"what": what, "met": None, "measured": f"ds_zero{stage} {ours.get('status', 'not run')}, "
                                                       f"hf_zero{stage} {hf.get('status', 'not run')}"}
    pairs = list(zip(ours.get("rounds_s_per_step", [ours["s_per_step"]]),
                     hf.get("rounds_s_per_step", [hf["s_per_step"]])))
    ratios = [h / o if o and h else None for o, h in pairs]
    measured = [r for r in ratios if r is not None]
    median = statistics.median(measured) if measured else None
    met = (len(measured) == len(pairs) and median >= ENGINE_MEDIAN_TARGET
           and min(measured) >= ENGINE_ROUND_FLOOR)
    return {"what": what, "met": met, "median_ratio": median, "round_ratios": ratios,
            "spread": [min(measured), max(measured)] if measured else None,
            "measured": ("per round " + ", ".join(_fmt(r, ".2f") + "x" for r in ratios)
                         + f"; median {_fmt(median, '.2f')}x, spread {min(measured):.2f}-{max(measured):.2f}x "
                         f"(s/step ds-vlm " + "/".join(_fmt(o, ".4f") for o, _ in pairs) + ", Trainer "
                         + "/".join(_fmt(h, ".4f") for _, h in pairs) + ")") if measured else "no round measured"}


def targets(report: dict) -> dict:
    zero2, zero3 = engine_target(report, 2), engine_target(report, 3)
    p = report.get("padding")
    budget = {"what": f"token-budget batches compute >= {TOKEN_BUDGET_TARGET:.0%} fewer tokens than fixed ones",
              "met": p["target_met"] if p else None,
              "measured": f"{p['computed_tokens_saved']:.1%} fewer ({p['token_budget']['computed_tokens']} vs "
                          f"{p['fixed']['computed_tokens']})" if p else "not run"}
    out = {"zero2_vs_hf_trainer": zero2, "zero3_vs_hf_trainer": zero3, "token_budget_padding": budget}
    packed, budget_run = report["cases"].get("batch_packed", {}), report["cases"].get("batch_budget", {})
    if packed.get("step_tokens_per_s") and budget_run.get("step_tokens_per_s"):
        rounds = list(zip(packed.get("rounds_step_tokens_per_s", [packed["step_tokens_per_s"]]),
                          budget_run.get("rounds_step_tokens_per_s", [budget_run["step_tokens_per_s"]])))
        faster = all(p is not None and b is not None and p >= b for p, b in rounds)
        out["packing"] = {"met": packed.get("padding_efficiency", 0) >= PACKED_EFFICIENCY_TARGET and faster,
                          "round_ratios": [p / b for p, b in rounds if p and b],
                          "measured": f"efficiency {packed.get('padding_efficiency', 0):.1%}; real tokens/s packed vs "
                                      "token budget per round: " + ", ".join(f"{_fmt(p, '.0f')}/{_fmt(b, '.0f')}"
                                                                             for p, b in rounds)}
    else:
        out["packing"] = {"met": None, "measured": f"batch_packed {packed.get('status', 'not run')}, "
                                                   f"batch_budget {budget_run.get('status', 'not run')}"}
    out["packing"]["what"] = (f"packed batches compute no padding (efficiency >= {PACKED_EFFICIENCY_TARGET:.0%}) "
                              "and train no slower than token-budget ones (real tokens per second of each step), in "
                              "every round")
    if report.get("loss_memory"):
        from benchmarks import loss_memory

        met, what = loss_memory.target(report["loss_memory"])
        ratio = report["loss_memory"]["ratio"]
        out["loss_memory"] = {"what": what.split(":")[0], "met": met,
                              "measured": "not measured" if ratio is None else f"{ratio:.3f}"}
    return out


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU only, {cores} cores, gloo"
