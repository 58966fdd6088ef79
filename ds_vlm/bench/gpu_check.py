"""The acceptance script for one short GPU run: each stage in its own process, with its own time budget.

    python -m ds_vlm.bench.gpu_check [--stages train_zero2,sweep_2b] [--out gpu_check.json] [--dry_run]
    bash launch/gpu_check.sh ...                 # the same, after installing carried wheels (see there)

Stages (in this order; `--stages a,b` runs some):
    train_zero2, train_zero3  the real entry (`deepspeed --num_gpus 1 launch/train.py`) on a small random
                              Qwen3-VL built offline: bf16, NCCL, packed, on the best attention kernel this
                              machine's torch and packages offer (recorded), a few steps
    save_resume               a checkpoint at step 2, resumed: steps 3-4 give the uninterrupted run's losses
    export                    train_zero3's hf/ reloaded with from_pretrained, and it generates
    lora                      LoRA on ZeRO-2: trains, exports merged and peft folders, the merged one loads
    qlora                     the same with 4-bit base weights (skipped where bitsandbytes is missing)
    liger                     --loss liger equals the chunked loss (value and gradients) at Qwen's vocabulary
    sweep_2b                  the Qwen3-VL-2B architecture, packed, at growing tokens per step: tokens/s, MFU,
                              peak allocated and reserved memory, the largest size that fits (gpu_sweep.py)
    plan                      `python -m ds_vlm.plan` at the sweep's sizes against each size's
                              max_memory_allocated (fails beyond 10%)
The result (`--out`): {"stages": [{name, status: ok|failed|skipped, seconds, detail}], ...}. A stage that
fails or runs out of its budget is recorded and the next one runs; the exit status is 1 if any failed.
`--dry_run` (what the test suite runs) uses the CPU: the tiny model, 1 CPU rank, fp32, gloo; the CUDA-only
stages are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: launch/train.py, ds_configs/

# name -> (seconds it may take on the GPU, what it needs besides a CPU: None, or (module, reason))
STAGES = {
    "train_zero2": (240, None),   # the first start JIT-builds DeepSpeed's FusedAdam (about a minute with nvcc)
    "train_zero3": (90, None),
    "save_resume": (120, None),
    "export": (60, None),
    "lora": (90, None),
    "qlora": (120, ("bitsandbytes", "QLoRA needs bitsandbytes and a CUDA GPU")),
    "liger": (60, ("liger_kernel", "--loss liger needs liger-kernel (Triton) and a CUDA GPU")),
    "sweep_2b": (300, None),
    "plan": (90, None),
    "deepspeed_features": (180, ("deepspeed", "ZeRO++'s quantized weights and gradients need DeepSpeed's CUDA "
                                              "quantizer kernels")),
}
TRAIN_FLAGS = ["--max_steps", "4", "--save_steps", "2", "--micro_batch_size", "4", "--packing", "--lr", "1e-3",
               "--warmup_ratio", "0", "--max_length", "512", "--dist_timeout_s", "120", "--num_workers", "1"]


# --------------------------------------------------------------------------- the orchestrator


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def skip_reason(name: str, dry_run: bool) -> str:
    """Why a stage cannot run here ('' if it can)."""
    import importlib.util

    needs = STAGES[name][1]
    if needs is None:
        return ""
    module, reason = needs
    if dry_run or not cuda_available():
        return f"{reason}: CUDA only (this is {'a dry run' if dry_run else 'a machine without CUDA'})"
    if importlib.util.find_spec(module) is None:
        return f"{reason}: {module} is not installed here"
    return ""


def run_stage(name: str, work: Path, dry_run: bool, budget: float) -> dict:
    """One stage in its own process; its record."""
    started = time.perf_counter()
    reason = skip_reason(name, dry_run)
    if reason:
        return {"name": name, "status": "skipped", "seconds": 0.0, "detail": {"reason": reason}}
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ds_vlm.bench.gpu_check", "--run_stage", name, "--workdir", str(work)]
    log = work / f"{name}.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.run(cmd + (["--dry_run"] if dry_run else []), cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=budget, env=_env())
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    seconds = round(time.perf_counter() - started, 1)
    tail = log.read_text(errors="replace")[-2500:] if log.exists() else ""
    if result.exists():
        detail = json.loads(result.read_text())
        status = "ok" if code == 0 else "failed"
    else:
        detail = {"error": f"over its {budget:.0f} s budget" if code is None else f"exit {code}", "log_tail": tail}
        status = "failed"
    if status == "failed" and "log_tail" not in detail:
        detail["log_tail"] = tail
    return {"name": name, "status": status, "seconds": seconds, "detail": detail}


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def prepare(work: Path) -> None:
    """The small random Qwen3-VL and its data, built once per work folder (no download)."""
    from ds_vlm.demo import build_data_dir, build_model_dir

    if not (work / "model" / "config.json").exists():
        build_model_dir(work / "model")
    if not (work / "data" / "train.jsonl").exists():
        build_data_dir(work / "data", n_train=64, n_test=4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--out", default="", help="write the stages' records as JSON here")
    parser.add_argument("--dry_run", action="store_true", help="on the CPU, the tiny model; CUDA-only stages skipped")
    parser.add_argument("--workdir", default="", help="keep the model, data and runs here (default: temporary)")
    parser.add_argument("--run_stage", default="", help=argparse.SUPPRESS)  # one stage, in its own process
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_vlm_gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.run_stage:
        from ds_vlm.bench import gpu_stages

        detail = getattr(gpu_stages, args.run_stage)(work, args.dry_run)
        (work / f"{args.run_stage}.json").write_text(json.dumps(detail, indent=2, default=str))
        return 0
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, GPU {gpu}{' (dry run on the CPU)' if args.dry_run else ''}; work {work}",
          flush=True)
    prepare(work)
    records, began = [], time.perf_counter()
    for name in names:
        budget = STAGES[name][0] * (3 if args.dry_run else 1)  # a shared 2-core CPU is slower than the GPU host
        record = run_stage(name, work, args.dry_run, budget)
        records.append(record)
        summary = {k: v for k, v in record["detail"].items() if k != "log_tail"}
        print(f"[{record['status']:>7}] {name} ({record['seconds']:.0f} s): {json.dumps(summary, default=str)[:600]}",
              flush=True)
    report = {"stages": records, "torch": torch.__version__, "gpu": gpu, "dry_run": args.dry_run,
              "seconds": round(time.perf_counter() - began, 1)}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [r["name"] for r in records if r["status"] == "failed"]
    print(f"{len(records) - len(failed)} of {len(records)} stages not failed in {report['seconds']:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    if not args.workdir and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
