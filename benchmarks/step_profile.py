"""Where one rank's step goes: ds-vlm against the transformers Trainer on the same DeepSpeed json, sampled
with py-spy (`pip install py-spy`; it reads the ranks' stacks from outside, the same way for both engines).

    python -m benchmarks.step_profile [--cases ds_zero2,hf_zero2,ds_zero3,hf_zero3] [--steps 120]
                                        [--rate 250] [--workdir DIR] [--out profile.json]

Each case runs as benchmarks/main.py runs it (the tiny preset, 2 CPU ranks; benchmarks/runner.py builds the
command) under `py-spy record --idle --subprocesses`. Rank 0's main-thread samples inside the training loop
are put in the first part of PARTS whose frames they hold (the Trainer's optimizer step runs inside
accelerate's backward: it counts as the step), and each part's share of the loop's samples is
turned into milliseconds per step with the loop's own wall time (samples / rate / steps). Sampling slows
every process a little: the shares are what to read; the total is the profiled run's, not the benchmark's.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

# (part, frame patterns), first match wins. A frame is "function (file)".
PARTS = (
    ("logging and bench instrumentation",
     (r"Trainer\.log_step \(.*ds_vlm/train\.py", r"RunLog\.", r"_maybe_log_save_evaluate", r"CallbackHandler\.",
      r"on_step_end \(.*hf_trainer", r"tqdm")),
    ("data: next batch, collate", (r"next_micro_batches", r"get_batch_samples", r"_next_data", r"Collator\.__call__",
                                   r"DataLoader|dataloader\.py|data_loader\.py")),
    ("step bookkeeping (label rows, FLOPs, counts, all-reduces)",
     (r"LabelRows\.from_labels", r"FlopsCounter", r"_on_device", r"all_reduce \(.*ds_vlm/distributed",
      r"reset_peak_memory", r"peak_memory_gb", r"PendingStep\.", r"read \(.*ds_vlm/step\.py",
      r"<lambda> \(.*step\.py")),
    ("loss (head + cross-entropy, forward and backward)",
     (r"ds_vlm/loss\.py", r"ForCausalLMLoss", r"fixed_cross_entropy", r"loss_utils\.py")),
    ("forward (model)", (r"DeepSpeedEngine\.forward", r"_call_impl \(.*module\.py")),
    ("optimizer step (clip, AdamW, ZeRO)", (r"DeepSpeedEngine\.step", r"DeepSpeedOptimizerWrapper\.step",
                                            r"optimizer\.py.*step", r"_take_model_step")),
    ("backward (incl. ZeRO's gradient reduction)", (r"DeepSpeedEngine\.backward", r"backward \(.*accelerator\.py",
                                                   r"_engine_run_backward", r"run_backward")),
    ("LR schedule, zero_grad, the rest of the loop", (r".",)),
)
# the per-step loop: ds-vlm's Trainer.train; the Trainer's _run_epoch (its _inner_training_loop also holds setup)
LOOP = {"ds": r"Trainer\.train \(.*ds_vlm/train\.py", "hf": r"Trainer\._run_epoch"}


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    return [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")], int(count)


def breakdown(raw: Path, engine: str, steps: int, rate: int) -> dict:
    """Milliseconds per step per part, from py-spy's raw (collapsed) output of one run."""
    counts: collections.Counter = collections.Counter()
    loop = re.compile(LOOP[engine])
    parts = [(name, [re.compile(p) for p in patterns]) for name, patterns in PARTS]
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        frames, n = _frames(line)
        processes = [f for f in frames if f.startswith("process ")]  # the launcher's, then the rank's
        if not processes or "--local_rank=0" not in processes[-1]:
            continue
        inside = [i for i, f in enumerate(frames) if loop.search(f)]
        if not inside:
            continue
        below = frames[inside[0] + 1:]
        for name, patterns in parts:
            if any(p.search(f) for f in below for p in patterns):
                counts[name] += n
                break
    total = sum(counts.values())
    per_step = {name: round(1000 * counts[name] / rate / steps, 2) for name, _ in PARTS}
    return {"ms_per_step": per_step, "loop_ms_per_step": round(1000 * total / rate / steps, 2), "samples": total}


def main(argv=None) -> int:
    from benchmarks.presets import PRESETS, build_model, build_train_data
    from benchmarks.runner import case_command, run_case
    from ds_vlm.runtime.distributed import free_port
    from ds_vlm.runtime.launcher import remove_shm_buffers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="ds_zero2,hf_zero2,ds_zero3,hf_zero3")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--reuse", action="store_true", help="read the profiles already in --workdir again")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        parser.error("py-spy is not installed: pip install py-spy")
    preset = PRESETS["tiny"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_vlm_profile_")).resolve()
    model, records = work / "model", preset["records"]
    if not (model / "config.json").exists():
        build_model("tiny", model, seed=0)
    data = work / "data" / "train.jsonl"
    if not data.exists():
        data = build_train_data("tiny", work / "data", records)
    settings = SimpleNamespace(steps=args.steps, micro_batch_size=preset["micro_batch_size"], lr=preset["lr"],
                               max_length=preset["max_length"], num_workers=0, gradient_checkpointing="false",
                               seed=42, num_ranks=2, peak_tflops=0)
    report = {"command": "python -m benchmarks.step_profile " + " ".join(argv or sys.argv[1:]), "cases": {}}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        out, port = work / "runs" / case, free_port()
        raw = work / f"{case}.spy.txt"
        if args.reuse and raw.exists():
            report["cases"][case] = {"status": "ok", **breakdown(raw, case[:2], args.steps, args.rate)}
            continue
        command = [spy, "record", "--idle", "--subprocesses", "--nonblocking", "--rate", str(args.rate),
                   "--format", "raw", "--output", str(raw), "--", *case_command(case, settings, model, data, out,
                                                                                 port)]
        print(f"[profile] {case}: {args.steps} steps under py-spy", flush=True)
        try:
            result = run_case(case, command, out, 600)
        finally:
            remove_shm_buffers(port)
        if not result["status"].startswith("ok") or not raw.exists():
            report["cases"][case] = {"status": result["status"], "log_tail": result.get("log_tail")}
            continue
        report["cases"][case] = {"status": "ok", **breakdown(raw, case[:2], args.steps, args.rate)}
    print(render(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def render(report: dict) -> str:
    cases = [c for c, r in report["cases"].items() if r.get("status") == "ok"]
    lines = ["| part of rank 0's step (ms) | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    for name, _ in PARTS:
        lines.append(f"| {name} | " + " | ".join(f"{report['cases'][c]['ms_per_step'][name]:.1f}" for c in cases)
                     + " |")
    lines.append("| **the loop, per step** | " + " | ".join(f"**{report['cases'][c]['loop_ms_per_step']:.1f}**"
                                                      for c in cases) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
