"""The benchmark's training cases: each case's command, its run in its own processes (peak RSS polled),
and its step times read back from its logs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from ds_vlm.runtime.launcher import launcher

ROOT = Path(__file__).resolve().parents[1]  # the repository: ds_configs/, launch/train.py

# batch_*: ds-vlm on ZeRO-2 on the varied-length data: fixed micro-batches, a token budget, packing + budget
BATCH_CASES = ("batch_fixed", "batch_budget", "batch_packed")
ALL_CASES = ("ds_zero0", "ds_zero2", "ds_zero3", "plain", "hf_zero0", "hf_zero2", "hf_zero3", *BATCH_CASES)
DEFAULT_CASES = ALL_CASES
# Run order: each engine's ZeRO-2 and ZeRO-3 back to back with the Trainer's (a shared machine's load drifts).
RUN_ORDER = ("ds_zero2", "hf_zero2", "ds_zero3", "hf_zero3", "ds_zero0", "hf_zero0", "plain", "batch_budget",
             "batch_packed", "batch_fixed")
REFERENCE = "hf_zero2"

# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Polls the peak RSS (VmHWM) of a run's rank processes while it runs.

    A rank is a process with --local_rank in its command line whose parent has none (its DataLoader
    workers are forks with the same command line and are left out); without a launcher, the process itself.
    """

    def __init__(self, proc: subprocess.Popen, ranked: bool, interval: float = 0.2):
        self.proc, self.ranked, self.interval = proc, ranked, interval
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def _hwm_gb(pid: int, process) -> float:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / 1e9
        except OSError:
            pass
        return process.memory_info().rss / 1e9  # no /proc: the current RSS, polled

    @staticmethod
    def _local_rank(cmdline: list[str]):
        for i, arg in enumerate(cmdline):
            if arg.startswith("--local_rank="):
                return int(arg.split("=", 1)[1])
            if arg == "--local_rank" and i + 1 < len(cmdline):
                return int(cmdline[i + 1])
        return None

    def _ranks(self):
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            if not self.ranked:
                return [(0, root)]
            found = []
            for child in root.children(recursive=True):
                rank = self._local_rank(child.cmdline())
                parent = child.parent()
                if rank is not None and (parent is None or self._local_rank(parent.cmdline()) is None):
                    found.append((rank, child))
            return found
        except psutil.Error:
            return []

    def _poll(self):
        import psutil

        while not self._stop.is_set():
            for rank, process in self._ranks():
                try:
                    self.peaks[rank] = max(self.peaks.get(rank, 0.0), self._hwm_gb(process.pid, process))
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return [round(self.peaks[r], 3) for r in sorted(self.peaks)]


def memory_estimate_gb(n_params: int, n_trainable: int, case: str, world: int, gpu: bool) -> float:
    """Weights + gradients + AdamW state per rank (activations not counted), in GB.

    CPU runs are fp32 (the trainer's auto precision there); GPU runs bf16 with fp32 master weights,
    gradients and Adam moments; the plain loop keeps fp32 weights and autocasts."""
    stage = int(case[-1]) if case.startswith(("ds_zero", "hf_zero")) else 0
    shards = world if case != "plain" else 1
    low = 2 if gpu and case != "plain" else 4  # bytes of a weight / gradient as the model holds it
    weights = n_params * low / (shards if stage == 3 else 1)
    grads = n_trainable * low / (shards if stage >= 2 else 1)
    master = n_trainable * 4 if low == 2 else 0
    if case.startswith("ds_zero") or case.startswith("hf_zero"):
        master += n_trainable * 4 if stage >= 1 and low == 4 else 0  # ZeRO 1-3 keep an fp32 partition copy
    states = (n_trainable * 8 + master) / (shards if stage >= 1 else 1)
    return (weights + grads + states) / 1e9


def available_memory_gb(gpu: bool) -> float:
    """Free memory for one rank on a GPU; free host memory for all ranks together on CPU."""
    if gpu:
        import torch

        return torch.cuda.mem_get_info()[0] / 1e9
    import psutil

    return psutil.virtual_memory().available / 1e9


# --------------------------------------------------------------------------- the runs


def case_command(case: str, args, model: Path, data: Path, out: Path, port: int) -> list[str]:
    """The command of one case. batch_* cases train on `args.varied_data` (its longest sample is
    `args.varied_max_length`) with the token budget `args.token_budget`."""
    if case in BATCH_CASES:
        data = args.varied_data
    common = ["--model", str(model), "--train_data", str(data), "--output_dir", str(out), "--max_steps",
              str(args.steps), "--micro_batch_size", str(args.micro_batch_size), "--lr", str(args.lr),
              "--max_length", str(args.varied_max_length if case in BATCH_CASES else args.max_length),
              "--num_workers", str(args.num_workers), "--gradient_checkpointing", args.gradient_checkpointing,
              "--seed", str(args.seed)]
    if case in BATCH_CASES:
        budget = ["--max_tokens_per_batch", str(args.token_budget)]
        flags = {"batch_fixed": [], "batch_budget": budget, "batch_packed": ["--packing", *budget]}[case]
        return launcher(args.num_ranks, port) + [
            str(ROOT / "launch" / "train.py"), *common, "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
            "--grad_accum", "1", "--warmup_ratio", "0", "--export_hf", "false", "--resume", "none", *flags]
    if case.startswith("ds_zero"):
        return launcher(args.num_ranks, port) + [
            str(ROOT / "launch" / "train.py"), *common,
            "--deepspeed", str(ROOT / "ds_configs" / f"zero{case[-1]}.json"),
            "--grad_accum", "1", "--warmup_ratio", "0", "--export_hf", "false", "--resume", "none",
            *(["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else [])]
    if case.startswith("hf_zero"):
        return launcher(args.num_ranks, port) + [
            "--module", "benchmarks.hf_trainer", *common,
            "--deepspeed", str(ROOT / "ds_configs" / f"zero{case[-1]}.json")]
    if case == "plain":
        return [sys.executable, "-m", "benchmarks.plain_loop", *common,
                "--world_size", str(args.num_ranks)]
    raise ValueError(f"unknown case {case!r}; choose from {', '.join(ALL_CASES)}")


def run_case(case: str, command: list[str], out: Path, timeout: int) -> dict:
    """Run one case in its own session; returns status, wall time, per-rank peak RSS, log tail."""
    if out.exists():
        shutil.rmtree(out)  # a previous run's metrics.jsonl would be appended to
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        log.write(shlex.join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        memory = PeakMemory(proc, ranked=case != "plain")
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # this run's own session: the launcher and its ranks
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
        peaks = memory.stop()
    tail = (out / "log.txt").read_text(errors="replace").strip().splitlines()[-12:]
    status = "ok" if rc == 0 else ("timeout" if rc is None else f"failed (exit {rc})")
    return {"status": status, "wall_s": round(time.perf_counter() - start, 1), "peak_rss_gb": peaks,
            "log": str(out / "log.txt"), **({"log_tail": tail} if rc != 0 else {})}


def step_rows(case: str, out: Path, world: int) -> list[dict]:
    """Per optimizer step: step, step_time_s, samples, tokens, computed, flops (None if unknown), loss."""
    if case.startswith("hf_zero"):
        per_rank = []
        for rank in range(world):
            path = out / f"steps_rank{rank}.jsonl"
            if not path.exists():
                return []
            per_rank.append([r for r in map(json.loads, path.open()) if "step" in r])
        start = [r for r in map(json.loads, (out / "steps_rank0.jsonl").open()) if r.get("event") == "start"]
        rows, last = [], start[0]["time"] if start else None
        for parts in zip(*per_rank):
            now = parts[0]["time"]
            rows.append({"step": parts[0]["step"], "step_time_s": now - last if last is not None else None,
                         "samples": sum(p["samples"] for p in parts), "tokens": sum(p["tokens"] for p in parts),
                         "computed": sum(p["computed"] for p in parts),
                         "flops": sum(p.get("flops") or 0 for p in parts) or None, "loss": parts[0].get("loss")})
            last = now
        return rows
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for r in map(json.loads, path.open()):
        if "event" in r or "step" not in r or r.get("step_time_s") is None:
            continue
        rows.append({"step": r["step"], "step_time_s": r["step_time_s"],
                     "samples": round(r.get("samples", r.get("samples_per_s", 0) * r["step_time_s"])),
                     "tokens": r.get("tokens"), "computed": r.get("computed"), "loss": r.get("loss"),
                     "padding_efficiency": r.get("padding_efficiency"),
                     "tflops_per_rank": r.get("tflops_per_gpu", r.get("tflops")), "mfu": r.get("mfu"),
                     "peak_mem_gb": r.get("peak_mem_gb"), "flops": r.get("flops")})
    return rows


def summarize(case: str, rows: list[dict], warmup: int, world: int, peak_tflops: float | None,
              interrupted_s: float = 0.0) -> dict:
    """Over the steps after `warmup`: the median step time, and samples/s and tokens/s as the median
    samples (tokens) per step over it (medians: robust to a busy shared machine). `interrupted_s`: steps at
    least that long spanned a pause of an alternating run (run_alternating) and are left out."""
    rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
    measured = [r for r in rows[warmup:] if r.get("step_time_s")
                and not (interrupted_s and r["step_time_s"] >= interrupted_s)]
    if not measured:
        return {"steps_logged": len(rows), "steps_measured": 0}
    ranks = 1 if case == "plain" else world
    times = [r["step_time_s"] for r in measured]
    step = statistics.median(times)
    out = {"steps_logged": len(rows), "steps_measured": len(measured), "s_per_step": step,
           "steps_interrupted": sum(1 for r in rows[warmup:] if interrupted_s and r.get("step_time_s")
                                    and r["step_time_s"] >= interrupted_s),
           "mean_s_per_step": sum(times) / len(times),
           "samples_per_step": statistics.median(r["samples"] for r in measured),
           "samples_per_s": statistics.median(r["samples"] for r in measured) / step,
           "tokens_per_s": statistics.median(r["tokens"] for r in measured) / step
           if all(r.get("tokens") is not None for r in measured) else None,
           "loss_first": rows[0].get("loss"), "loss_last": rows[-1].get("loss")}
    if all(r.get("tokens") for r in measured):  # each step's own rate: fair where steps hold different samples
        out["step_tokens_per_s"] = statistics.median(r["tokens"] / r["step_time_s"] for r in measured)
    if all(r.get("padding_efficiency") for r in measured):  # ds-vlm's own runs log it
        out["padding_efficiency"] = statistics.median(r["padding_efficiency"] for r in measured)
        out["computed_tokens_per_step"] = statistics.median(r["tokens"] / r["padding_efficiency"] for r in measured)
    if all(r.get("flops") for r in measured):
        out["tflops_per_rank"] = statistics.median(r["flops"] / r["step_time_s"] / ranks / 1e12 for r in measured)
    elif all(r.get("tflops_per_rank") is not None for r in measured):
        out["tflops_per_rank"] = statistics.median(r["tflops_per_rank"] for r in measured)
    if peak_tflops and out.get("tflops_per_rank") is not None:
        out["mfu"] = out["tflops_per_rank"] / peak_tflops
    if measured[-1].get("peak_mem_gb") is not None:
        out["reported_peak_mem_gb"] = measured[-1]["peak_mem_gb"]
    return out


def hf_extras(out: Path, world: int) -> dict:
    """Whether accelerate needed the CPU patch, and the ranks' own CUDA peaks (GPU runs)."""
    extras = {}
    starts = [r for r in map(json.loads, (out / "steps_rank0.jsonl").open()) if r.get("event") == "start"]
    extras["accelerate_cpu_patch"] = bool(starts and starts[0].get("accelerate_cpu_patch"))
    reported = [json.loads((out / f"peak_rank{rank}.json").read_text()).get("peak_cuda_gb")
                for rank in range(world) if (out / f"peak_rank{rank}.json").exists()]
    if any(x is not None for x in reported):
        extras["reported_peak_mem_gb"] = reported
    return extras


def combine_rounds(results: list[dict]) -> dict:
    """One case over --repeats rounds: the round with the median step time (the only one if 1 round),
    the largest peak RSS per rank, and every round's step time."""
    ok = [r for r in results if r["status"].startswith("ok") and r.get("s_per_step")]
    if not ok:
        return results[-1]
    chosen = dict(sorted(ok, key=lambda r: r["s_per_step"])[(len(ok) - 1) // 2])
    if len(results) > 1:
        chosen["rounds_s_per_step"] = [r.get("s_per_step") for r in results]
        chosen["rounds_step_tokens_per_s"] = [r.get("step_tokens_per_s") for r in results]
        chosen["rounds_status"] = [r["status"] for r in results]
        chosen["rounds_failed"] = [{"round": i + 1, "status": r["status"], "log_tail": r.get("log_tail", [])}
                                   for i, r in enumerate(results) if r["status"] != "ok"]
        peaks = [r["peak_rss_gb"] for r in ok if r.get("peak_rss_gb")]
        chosen["peak_rss_gb"] = [max(p[i] for p in peaks) for i in range(min(map(len, peaks)))] if peaks else []
    return chosen
