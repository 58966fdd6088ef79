"""Training throughput, memory and padding, measured in one run on one model and one data set.

    python -m benchmarks.main [--preset tiny|qwen3-vl-2b] [--workdir DIR] [--out bench.json]
                           [--steps N --warmup N --micro_batch_size 8 --num_ranks 2 --repeats 3]
                           [--pairing alternate|sequential --window_s 3]
                           [--loss_memory_tokens 16384]
                           [--cases ds_zero0,ds_zero2,ds_zero3,plain,hf_zero0,hf_zero2,hf_zero3] [--dry_run]

Builds the model and the data offline into --workdir (a temporary folder by default), then runs,
each in its own processes on the same model, data and global batch:
- ds_zeroK: this trainer, `deepspeed --num_gpus R launch/train.py ... --deepspeed ds_configs/zeroK.json`;
- plain: a plain PyTorch loop in one process (same model, same global batches, torch.optim.AdamW);
- hf_zeroK: the transformers Trainer on the same json (benchmarks/hf_trainer.py), the path LLaVA and the
  official Qwen-VL scripts take, with ds_vlm's Encoder and Collator (only the engine differs).
Per case: the median seconds per step after --warmup steps, samples/s and tokens/s over it, the
peak RSS of every rank process (its VmHWM, polled; CUDA peak allocated memory on GPUs) and model
TFLOP/s per rank (MFU where the device's peak is known or --peak_tflops is given).

Then, without training: the padding of fixed micro-batches against token-budget micro-batches
(TokenBudgetPlan, --max_tokens_per_batch) on a varied-length variant of the data (answers of 1 to 41
sentences, images of 5 side lengths), with every record's real token count from the real encoder.

Prints a table of ratios against the transformers Trainer on ZeRO-2 and writes everything to --out.
Then the loss's extra peak memory (benchmarks/loss_memory.py): the old full-logits loss against the
label-rows chunked one, Qwen3-VL-2B's head, --loss_memory_tokens tokens of which 10% are labels.

Each ZeRO stage's two engines (ds_zeroK, hf_zeroK), and batch_budget with batch_packed, run as a pair
taking turns (--pairing alternate, the default): both start together, each is paused once it has logged a
step, then they run one at a time in windows of --window_s seconds until both end, so a shared machine's
drifting load falls on both alike; a step that spans a pause is left out. Each round gives one ratio per
stage (the Trainer's median s/step over ours); the target reads the rounds' median and their spread.

Targets: ds-vlm's ZeRO-2 and ZeRO-3 steps no slower than the Trainer's on the same json (median of the
rounds' ratios >= 1.0x, no round below 0.95x); the label-rows loss's extra
peak memory at most 1/10 of the full-logits loss's; token-budget batches
compute at least 25% fewer tokens than fixed ones on the varied data.

`--preset qwen3-vl-2b` builds the real Qwen3-VL-2B-Instruct architecture with random weights (bf16,
~4.3 GB on disk; no download) and a demo-style tokenizer and processor, for GPU throughput and MFU
runs; a case whose memory estimate does not fit this machine is refused with the numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.alternate import run_alternating, run_groups
from benchmarks.padding import padding_report
from benchmarks.plain_loop import plain_loop
from benchmarks.presets import (
    PRESETS,
    build_model,
    build_shapes_data,
    build_train_data,
    count_parameters,
    token_lengths,
)
from benchmarks.report import _fmt, machine, render, targets
from benchmarks.runner import (
    ALL_CASES,
    BATCH_CASES,
    DEFAULT_CASES,
    RUN_ORDER,
    available_memory_gb,
    case_command,
    combine_rounds,
    hf_extras,
    memory_estimate_gb,
    run_case,
    step_rows,
    summarize,
)
from ds_vlm.runtime.distributed import free_port
from ds_vlm.runtime.launcher import remove_shm_buffers


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plain-loop"]:
        return plain_loop(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    parser.add_argument("--workdir", default="", help="build model and data here and keep the runs "
                                                      "(default: a temporary folder, removed at the end)")
    parser.add_argument("--out", default="", help="write the report as JSON here")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"from {', '.join(ALL_CASES)}; "
                                                                         "'none': only the padding part")
    parser.add_argument("--num_ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per case (0: the preset's)")
    parser.add_argument("--warmup", type=int, default=-1, help="first steps left out (-1: the preset's)")
    parser.add_argument("--micro_batch_size", type=int, default=0, help="per rank (0: the preset's)")
    parser.add_argument("--records", type=int, default=0,
                        help="training records (0: the preset's, or enough for one pass)")
    parser.add_argument("--num_workers", type=int, default=-1,
                        help="DataLoader workers per rank, every case (-1: 0 on CPU, where a worker per rank "
                             "oversubscribes the cores; 1 on GPUs)")
    parser.add_argument("--gradient_checkpointing", default="false", choices=("true", "false"))
    parser.add_argument("--padding_records", type=int, default=512)
    parser.add_argument("--max_tokens_per_batch", type=int, default=0,
                        help="token budget of the padding comparison (0: micro-batch x mean length, >= longest)")
    parser.add_argument("--loss_memory_tokens", type=int, default=16384,
                        help="tokens of the loss-memory case (Qwen3-VL-2B's head; 0 skips it)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: known GPUs)")
    parser.add_argument("--dry_run", action="store_true", help="2 steps per case, none dropped, few records")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all cases (a shared machine's load "
                                                                "drifts); each case reports its median round, "
                                                                "and every round")
    parser.add_argument("--pairing", default="alternate", choices=("alternate", "sequential"),
                        help="alternate: each ZeRO stage's ds-vlm and Trainer cases run together, taking turns "
                             "every --window_s seconds (the same drift of a shared machine on both); "
                             "sequential: one case after the other")
    parser.add_argument("--window_s", type=float, default=3.0, help="an alternating case's turn, in seconds")
    parser.add_argument("--case_timeout", type=int, default=300, help="seconds before a case is stopped")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.steps = 2 if args.dry_run else (args.steps or preset["steps"])
    args.warmup = 0 if args.dry_run else (preset["warmup"] if args.warmup < 0 else args.warmup)
    args.micro_batch_size = args.micro_batch_size or preset["micro_batch_size"]
    args.max_length, args.lr = preset["max_length"], preset["lr"]
    if args.dry_run:
        args.padding_records = min(args.padding_records, 64)
        args.loss_memory_tokens = 0
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves none of --steps {args.steps} to measure")
    cases = [] if args.cases == "none" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(ALL_CASES)}")
    records = args.records or min(args.steps * args.micro_batch_size * args.num_ranks,
                                  preset.get("records") or 10**9)

    import torch

    gpu = torch.cuda.is_available()
    if args.num_workers < 0:
        args.num_workers = 1 if gpu else 0
    if args.dry_run:
        args.repeats = 1
    if gpu and torch.cuda.device_count() < args.num_ranks:
        parser.error(f"--num_ranks {args.num_ranks}: this machine has {torch.cuda.device_count()} GPU(s)")
    temp = None if args.workdir else tempfile.TemporaryDirectory(prefix="ds_vlm_bench_")
    work = Path(args.workdir or temp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m benchmarks.main " + shlex.join(argv), "preset": args.preset, "machine": machine(),
              "settings": {k: getattr(args, k) for k in ("num_ranks", "steps", "warmup", "micro_batch_size",
                                                         "num_workers", "gradient_checkpointing", "max_length",
                                                         "lr", "seed", "repeats", "pairing", "window_s")},
              "cases": {}, "padding": None}
    report["settings"].update(records=records, workdir=str(work))
    t0 = time.perf_counter()

    # -- model, data, and what each case needs -------------------------------------------
    print(f"[bench] building the {args.preset} model and {records} training records in {work}", flush=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_model(args.preset, model_dir, seed=0)
    data = work / "data" / "train.jsonl"
    if not data.exists() or sum(1 for _ in data.open()) != records:
        data = build_train_data(args.preset, work / "data", records)
    from transformers import AutoConfig

    n_params, n_trainable = count_parameters(AutoConfig.from_pretrained(model_dir))
    report["model"] = {"dir": str(model_dir), "parameters": n_params, "trainable": n_trainable}
    print(f"[bench] model: {n_params / 1e6:.2f} M parameters, {n_trainable / 1e6:.2f} M trained", flush=True)
    peak = args.peak_tflops or None
    try:
        from ds_vlm.runtime.flops import device_peak_tflops

        peak = device_peak_tflops(args.peak_tflops)
    except ImportError:
        pass

    # -- padding: fixed vs token-budget vs packed micro-batches, no training ------------------------
    print(f"[bench] padding: encoding {args.padding_records} varied-length records", flush=True)
    args.varied_data = build_shapes_data(work / "varied", args.padding_records, args.seed,
                                         PRESETS[args.preset]["image_side"], varied=True)
    lengths = token_lengths(model_dir, args.varied_data, max_length=100_000)
    report["padding"] = padding_report(lengths, args.micro_batch_size, args.num_ranks, args.max_tokens_per_batch,
                                       args.seed)
    args.token_budget, args.varied_max_length = report["padding"]["max_tokens_per_batch"], max(lengths)

    # -- training cases ----------------------------------------------------------------------
    available = available_memory_gb(gpu)
    runnable = []
    for case in sorted(cases, key=RUN_ORDER.index):
        need = memory_estimate_gb(n_params, n_trainable, "ds_zero2" if case in BATCH_CASES else case,
                                  args.num_ranks, gpu)
        need_here = need if gpu or case == "plain" else need * args.num_ranks
        if need_here > 0.85 * available:
            where = "one GPU's free memory" if gpu else ("free host memory" if case == "plain"
                                                         else "free host memory for all ranks")
            reason = (f"needs ~{need_here:.1f} GB for weights, gradients and AdamW state alone "
                      f"({n_params / 1e9:.2f} B parameters, {n_trainable / 1e9:.2f} B trained, "
                      f"{'bf16 + fp32 master' if gpu and case != 'plain' else 'fp32'}), {where} is {available:.1f} GB: "
                      f"run the {args.preset} preset on GPUs")
            report["cases"][case] = {"status": "refused", "reason": reason}
            print(f"[bench] {case}: refused: {reason}", flush=True)
        else:
            runnable.append(case)
    rounds: dict[str, list[dict]] = {case: [] for case in runnable}
    for round_no in range(args.repeats):
        for group in run_groups(runnable, args.pairing == "alternate"):
            label = " + ".join(group) + (" (taking turns)" if len(group) > 1 else "")
            print(f"[bench] {label}: running ({args.steps} steps)"
                  + (f", round {round_no + 1}/{args.repeats}" if args.repeats > 1 else ""), flush=True)
            runs, ports = [], []
            for case in group:
                out = work / "runs" / (case if args.repeats == 1 else f"{case}_{round_no + 1}")
                ports.append(free_port())
                runs.append((case, case_command(case, args, model_dir, data, out, ports[-1]), out))
            try:
                if len(runs) == 1:
                    results = {runs[0][0]: run_case(*runs[0], args.case_timeout)}
                else:
                    results = run_alternating(runs, args.case_timeout * len(runs), args.window_s)
            finally:
                for port in ports:
                    remove_shm_buffers(port)
            for case, _, out in runs:
                result = results[case]
                rows = step_rows(case, out, args.num_ranks)
                if result["status"] != "ok" and len({r["step"] for r in rows}) >= args.steps:
                    # every step ran and was logged; the processes failed on the way out (seen: exit 250 = a
                    # rank's SIGABRT at shutdown on this shared CPU). The step times stand; the status says so.
                    result["status"] = f"ok, then {result['status']} at shutdown"
                if result["status"].startswith("ok"):
                    result.update(summarize(case, rows, args.warmup, args.num_ranks, peak,
                                            result.get("interrupted_s", 0.0)))
                    if case.startswith("hf_zero"):
                        result.update(hf_extras(out, args.num_ranks))
                rounds[case].append(result)
                print(f"[bench] {case}: {result['status']}, {_fmt(result.get('samples_per_s'), '.1f')} samples/s, "
                      f"{_fmt(result.get('s_per_step'), '.4f')} s/step, peak RSS {result.get('peak_rss_gb')} GB, "
                      f"{result['wall_s']:.0f} s", flush=True)
    for case, results in rounds.items():
        report["cases"][case] = combine_rounds(results)

    # -- the loss's memory: full logits against logits at label rows, no training -------------------
    if args.loss_memory_tokens:
        from benchmarks import loss_memory

        print(f"[bench] loss memory at {args.loss_memory_tokens} tokens (a few minutes on a CPU)", flush=True)
        report["loss_memory"] = loss_memory.run(args.loss_memory_tokens, "cuda" if gpu else "cpu")

    report["cases"] = {case: report["cases"][case] for case in ALL_CASES if case in report["cases"]}
    report["targets"] = targets(report)
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    text = render(report)
    report["table"] = text
    print("\n" + text + f"\n\ntotal {report['total_wall_s']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"[bench] wrote {args.out}")
    if temp is not None:
        temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
