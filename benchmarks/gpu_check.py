"""The acceptance script for a short GPU lease: stages in priority order, each in its own process group with its
own budget, the result written after every stage.

    python -m benchmarks.gpu_check [--budget_s S] [--out F] [--resume F] [--stages a,b] [--dry_run]
    bash launch/gpu_check.sh ...                 # the same, after installing carried wheels (see there)

A lease of the kind this project gets is 15 minutes of device time in all (the machine's start and idle time
included) and at most 600 s a call: the check runs in two calls. The first, `--budget_s 420`, runs the stages
that matter most; the second, right after (the machine stays warm for seconds only), `--resume F` runs what the
first left, in what remains. Stages (each with `planned_s`, the device seconds it is budgeted on one H100/H200):
    imports       the versions found (torch, CUDA, GPU, deepspeed, transformers, peft, the evaluation's
                  rouge-score/nltk/regex, bitsandbytes, liger-kernel, FLA, flash-attn); the required ones import
    train_zero2   the real entry (`deepspeed --num_gpus 1 launch/train.py`) on a small random Qwen3-VL built
                  offline: bf16, NCCL, packed, the attention kernel it got recorded, 4 steps, checkpoints, hf/
    save_resume   train_zero2's checkpoint at step 2 resumed: steps 3-4 equal the uninterrupted run's
    export        train_zero2's hf/ reloaded with from_pretrained, and it generates
    eval          a ZeRO-3 run with --eval_data: eval loss, greedy answers, scores and the HTML report
    qlora         LoRA on 4-bit NF4 base weights: the vision tower bit-identical in the merged export
    lora          LoRA on ZeRO-2: trains, exports merged and peft folders, the merged one loads
    liger         --loss liger equals the chunked loss (value and gradients) at Qwen's vocabulary
    sweep_2b      the Qwen3-VL-2B architecture, packed, at growing tokens per step: tokens/s, MFU, peak
                  allocated and reserved memory, the largest size that fits (gpu_sweep.py)
    plan          `python -m ds_vlm.plan` at the sweep's sizes against each size's max_memory_allocated
A stage starts only if its planned_s fits in what is left of --budget_s (counted from the script's start,
the wheels' install included: gpu_check.sh passes its start time); else it is recorded `not_run` with the
reason, for a later call. A stage over its time is killed with its whole process group (the DeepSpeed launcher
and its ranks too), recorded `failed`, and the next one runs. The result (`--out`, rewritten after every
stage): {"stages": [{name, status: ok|failed|skipped|not_run, planned_s, seconds, detail}], "complete": bool,
...}; the exit status is 1 if any stage failed. `--dry_run` (what the test suite runs) uses the CPU: the tiny
model, 1 CPU rank, fp32, gloo; the CUDA-only stages are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from benchmarks.gpu_common import ROOT, stage_env


@dataclass(frozen=True)
class Stage:
    name: str
    planned_s: int                  # device seconds on one H100/H200, the first start's JIT builds included
    needs: Optional[tuple[str, str]] = None  # (module, reason): what it needs besides a CPU
    after: str = ""                 # a stage whose work it reads (it runs only once that one is ok)


# In priority order. The first five (400 s planned) fit one 420 s call with the wheels' install.
STAGES = (
    Stage("imports", 30),
    Stage("train_zero2", 150),    # DeepSpeed's import and FusedAdam's JIT build with nvcc (~1 minute) come first
    Stage("save_resume", 60, after="train_zero2"),
    Stage("export", 40, after="train_zero2"),
    Stage("eval", 120),
    Stage("qlora", 75, ("bitsandbytes", "QLoRA needs bitsandbytes")),
    Stage("lora", 50),
    Stage("liger", 30, ("liger_kernel", "--loss liger needs liger-kernel (Triton) and a CUDA GPU")),
    Stage("sweep_2b", 180),
    Stage("plan", 45, after="sweep_2b"),
    Stage("deepspeed_features", 120, ("deepspeed", "ZeRO++'s quantized weights and gradients need DeepSpeed's CUDA "
                                                   "quantizer kernels")),
)
BY_NAME = {s.name: s for s in STAGES}
FIRST_CALL_S = 420
CUDA_ONLY = {"liger", "deepspeed_features"}
# stages the dry run leaves to the GPU, though a CPU could run them: the suite covers them once already
DRY_RUN_LEAVES = {"qlora": "QLoRA trains on the CPU in tests/dist/test_lora.py (the same checks); the dry run leaves "
                           "it to the GPU"}
DRY_RUN_SLOWDOWN = 4  # a shared 2-core CPU against the GPU host: the dry run's stage timeouts
OVERRUN = 1.5         # a stage may run this much over its plan before it is killed (never past the budget)


# --------------------------------------------------------------------------- the orchestrator


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def skip_reason(stage: Stage, dry_run: bool) -> str:
    """Why a stage cannot run here ('' if it can)."""
    import importlib.util

    if dry_run and stage.name in DRY_RUN_LEAVES:
        return DRY_RUN_LEAVES[stage.name]
    if stage.needs is None:
        return ""
    module, reason = stage.needs
    if stage.name in CUDA_ONLY and (dry_run or not cuda_available()):
        return f"{reason}: CUDA only (this is {'a dry run' if dry_run else 'a machine without CUDA'})"
    if importlib.util.find_spec(module) is None:
        return f"{reason}: {module} is not installed here"
    return ""


def kill_group(proc: subprocess.Popen) -> None:
    """The stage's whole process group (the launcher, its ranks, loader workers): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # the stage's own process reaped once it ends: a zombie keeps its group alive to killpg
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_stage(stage: Stage, work: Path, dry_run: bool, timeout_s: float, cmd: Optional[list[str]] = None) -> dict:
    """One stage in its own process group (killed whole at `timeout_s`, and after it ends: nothing it started
    outlives it); its record (run_check has skipped what cannot run here). `cmd`: the stage's process (default:
    this module's --run_stage)."""
    started = time.perf_counter()
    record = {"name": stage.name, "planned_s": stage.planned_s}
    result = work / f"{stage.name}.json"
    result.unlink(missing_ok=True)
    if cmd is None:
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--run_stage", stage.name, "--workdir", str(work)]
        cmd += ["--dry_run"] if dry_run else []
    log = work / f"{stage.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=stage_env(), start_new_session=True)
        try:
            code: Optional[int] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_group(proc)
            proc.wait()
    seconds = round(time.perf_counter() - started, 1)
    tail = log.read_text(errors="replace")[-2500:] if log.exists() else ""
    if result.exists() and code == 0:
        return {**record, "status": "ok", "seconds": seconds, "detail": json.loads(result.read_text())}
    error = f"over its {timeout_s:.0f} s (killed with its process group)" if code is None else f"exit {code}"
    return {**record, "status": "failed", "seconds": seconds, "detail": {"error": error, "log_tail": tail}}


def prepare(work: Path) -> None:
    """The small random Qwen3-VL and its data, built once per work folder (no download)."""
    from ds_vlm.demo import build_data_dir, build_model_dir

    if not (work / "model" / "config.json").exists():
        build_model_dir(work / "model")
    if not (work / "data" / "train.jsonl").exists():
        build_data_dir(work / "data", n_train=64, n_test=4)


def write_report(path: str, report: dict) -> None:
    """`report` to `path`, whole or not at all (a reader never sees half a file)."""
    if not path:
        return
    partial = Path(path + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(partial, path)


def earlier_records(path: str) -> dict[str, dict]:
    """--resume: the stages an earlier call ran (ok, failed or skipped), by name; not_run ones are run again."""
    if not path or not Path(path).exists():
        return {}
    return {r["name"]: r for r in json.loads(Path(path).read_text())["stages"] if r["status"] != "not_run"}


def run_check(names: list[str], work: Path, dry_run: bool, budget_s: float, began: float, out: str,
              earlier: dict[str, dict], header: dict) -> list[dict]:
    """The stages `names` in order, each started only if its plan fits what is left of `budget_s` (0: no
    budget) since `began` (a time.time()) and the stage it reads from is ok; `out` rewritten after every stage."""
    records: list[dict] = []
    for name in names:
        stage = BY_NAME[name]
        left = budget_s - (time.time() - began) if budget_s else float("inf")
        done = {r["name"]: r["status"] for r in [*earlier.values(), *records]}
        waiting = ""
        if stage.planned_s > left:
            waiting = f"{max(0, left):.0f} s left of --budget_s {budget_s:.0f} and it plans {stage.planned_s} s"
        elif stage.after and done.get(stage.after, "not_run") == "not_run":
            waiting = f"it reads {stage.after}'s run, which has not run yet"
        if name in earlier:
            record = earlier[name]
        elif reason := skip_reason(stage, dry_run):  # what cannot run here says so, budget or not
            record = {"name": name, "planned_s": stage.planned_s, "status": "skipped", "seconds": 0.0,
                      "detail": {"reason": reason}}
        elif stage.after and done.get(stage.after) in ("failed", "skipped"):
            record = {"name": name, "planned_s": stage.planned_s, "status": "skipped", "seconds": 0.0,
                      "detail": {"reason": f"it reads {stage.after}'s run, which {done[stage.after]}"}}
        elif waiting:
            record = {"name": name, "planned_s": stage.planned_s, "status": "not_run", "seconds": 0.0,
                      "detail": {"reason": f"{waiting}: run it with --resume in the next call"}}
        else:
            timeout = stage.planned_s * DRY_RUN_SLOWDOWN if dry_run else min(stage.planned_s * OVERRUN, left)
            record = run_stage(stage, work, dry_run, timeout)
            summary = {k: v for k, v in record["detail"].items() if k != "log_tail"}
            print(f"[{record['status']:>7}] {name} ({record['seconds']:.0f} s of {stage.planned_s} planned): "
                  f"{json.dumps(summary, default=str)[:600]}", flush=True)
        records.append(record)
        write_report(out, {**header, "stages": records, "complete": False,
                           "seconds": round(time.time() - began, 1)})
    write_report(out, {**header, "stages": records, "complete": True, "seconds": round(time.time() - began, 1)})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(BY_NAME), help=f"comma-separated, from {', '.join(BY_NAME)}")
    parser.add_argument("--budget_s", type=float, default=0.0,
                        help="device seconds this call may use, the wheels' install included (0: no limit); a stage "
                             "starts only if its planned_s fits in what is left")
    parser.add_argument("--out", default="", help="write the stages' records as JSON here, after every stage")
    parser.add_argument("--resume", default="", help="an earlier call's --out: its stages are kept, the rest run")
    parser.add_argument("--dry_run", action="store_true", help="on the CPU, the tiny model; CUDA-only stages skipped")
    parser.add_argument("--workdir", default="", help="keep the model, data and runs here (default: temporary)")
    parser.add_argument("--run_stage", default="", help=argparse.SUPPRESS)  # one stage, in its own process
    args = parser.parse_args(argv)
    began = float(os.environ.get("DS_VLM_GPU_CHECK_T0") or time.time())  # gpu_check.sh's start
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_vlm_gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.run_stage:
        from benchmarks import gpu_stages

        detail = gpu_stages.STAGE_FUNCTIONS[args.run_stage](work, args.dry_run)
        (work / f"{args.run_stage}.json").write_text(json.dumps(detail, indent=2, default=str))
        return 0
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in BY_NAME]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(BY_NAME)}")
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    budget = f"budget {args.budget_s:.0f} s" if args.budget_s else "no budget"
    print(f"torch {torch.__version__}, GPU {gpu}{' (dry run on the CPU)' if args.dry_run else ''}; work {work}; "
          f"{budget}", flush=True)
    prepare(work)
    header = {"torch": torch.__version__, "gpu": gpu, "dry_run": args.dry_run, "budget_s": args.budget_s}
    records = run_check(names, work, args.dry_run, args.budget_s, began, args.out, earlier_records(args.resume),
                        header)
    failed = [r["name"] for r in records if r["status"] == "failed"]
    left = [r["name"] for r in records if r["status"] == "not_run"]
    print(f"{len(records) - len(failed) - len(left)} of {len(records)} stages not failed in "
          f"{time.time() - began:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + (f"; not run (budget): {', '.join(left)}" if left else ""), flush=True)
    if not args.workdir and not failed and not left:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
