#!/usr/bin/env python
"""Training throughput, memory and padding, measured in one run on one model and one data set.

    python launch/bench.py [--preset tiny|qwen3-vl-2b] [--workdir DIR] [--out bench.json]
                           [--steps 40 --warmup 10 --micro_batch_size 8 --num_ranks 2 --repeats 2]
                           [--cases ds_zero0,ds_zero2,ds_zero3,plain,hf_zero0,hf_zero2,hf_zero3] [--dry_run]

Builds the model and the data offline into --workdir (a temporary folder by default), then runs,
each in its own processes on the same model, data and global batch:
- ds_zeroK: this trainer, `deepspeed --num_gpus R launch/train.py ... --deepspeed ds_configs/zeroK.json`;
- plain: a plain PyTorch loop in one process (same model, same global batches, torch.optim.AdamW);
- hf_zeroK: the transformers Trainer on the same json (launch/bench_hf_trainer.py), the path LLaVA and the
  official Qwen-VL scripts take, with ds_vlm's Encoder and Collator (only the engine differs).
Per case: the median seconds per step after --warmup steps, samples/s and tokens/s over it, the
peak RSS of every rank process (its VmHWM, polled; CUDA peak allocated memory on GPUs) and model
TFLOP/s per rank (MFU where the device's peak is known or --peak_tflops is given).

Then, without training: the padding of fixed micro-batches against token-budget micro-batches
(TokenBudgetPlan, --max_tokens_per_batch) on a varied-length variant of the data (answers of 1 to 41
sentences, images of 5 side lengths), with every record's real token count from the real encoder.

Prints a table of ratios against the transformers Trainer on ZeRO-2 and writes everything to --out.
Then the loss's extra peak memory (ds_vlm/bench/loss_memory.py): the old full-logits loss against the
label-rows chunked one, Qwen3-VL-2B's head, --loss_memory_tokens tokens of which 10% are labels.

Targets: ds-vlm's ZeRO-2 step no slower than the Trainer's on the same json; the label-rows loss's extra
peak memory at most 1/10 of the full-logits loss's; token-budget batches
compute at least 25% fewer tokens than fixed ones on the varied data.

`--preset qwen3-vl-2b` builds the real Qwen3-VL-2B-Instruct architecture with random weights (bf16,
~4.3 GB on disk; no download) and a demo-style tokenizer and processor, for GPU throughput and MFU
runs; a case whose memory estimate does not fit this machine is refused with the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {
    # The demo's tiny Qwen3-VL (0.4 M parameters, 64x64 images -> 16 image tokens) on the demo data.
    # 120 steps over 640 records (4 epochs): ~6 s of measured steps per case, so that a shared machine's
    # bursts of load average out (with 40 steps, rounds of the same case differed by up to 40%).
    "tiny": dict(image_side=64, micro_batch_size=8, steps=120, warmup=10, max_length=512, lr=1e-4, records=640),
    # Qwen3-VL-2B-Instruct's architecture, random weights; 448x448 images -> 196 image tokens.
    "qwen3-vl-2b": dict(image_side=448, micro_batch_size=4, steps=30, warmup=10, max_length=4096, lr=2e-5),
}
ALL_CASES = ("ds_zero0", "ds_zero2", "ds_zero3", "plain", "hf_zero0", "hf_zero2", "hf_zero3")
DEFAULT_CASES = ALL_CASES
# Run order: each engine's ZeRO-2 and ZeRO-3 back to back with the Trainer's (a shared machine's load drifts).
RUN_ORDER = ("ds_zero2", "hf_zero2", "ds_zero3", "hf_zero3", "ds_zero0", "hf_zero0", "plain")
REFERENCE = "hf_zero2"
TOKEN_BUDGET_TARGET = 0.25  # token-budget batches compute at least this much less than fixed ones

# --------------------------------------------------------------------------- Qwen3-VL-2B preset

def demo_tokenizer():
    """The demo's byte-level BPE (Qwen's special tokens and chat template), trained on the benchmark's words."""
    from ds_vlm.demo import CHAT_TEMPLATE, COLORS, SHAPES, build_tokenizer, caption

    words = [caption(c, s) for c in COLORS for s in SHAPES] + ["What is in this picture?"]
    words += [s.format(color=c, shape=h) for s in EXTRA_SENTENCES for c in COLORS for h in SHAPES]
    return build_tokenizer(words, (), CHAT_TEMPLATE)


def preset_config(preset: str):
    """(model config, tokenizer, processor) of a preset, nothing built (the tiny one: read from a built dir)."""
    from ds_vlm.demo import QWEN_SPECIAL_TOKENS

    if preset != "qwen3-vl-2b":
        raise ValueError(f"preset_config: only qwen3-vl-2b is built from a config here, not {preset!r}")
    tokenizer = demo_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    from ds_vlm.models.qwen3_vl import qwen3_vl_2b_config, qwen3_vl_2b_processor

    return qwen3_vl_2b_config(ids), tokenizer, qwen3_vl_2b_processor(tokenizer)


def count_parameters(config) -> tuple[int, int]:
    """(all parameters, those ds_vlm trains by default: projector + language tower) on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import TrainConfig
    from ds_vlm.engine import set_trainable
    from ds_vlm.models import adapter_for

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    set_trainable(model, adapter_for(config.model_type), TrainConfig(model="x", train_data="x"))
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def build_model(preset: str, out: Path, seed: int = 0) -> Path:
    """The preset's model folder (config, random weights, tokenizer, processor)."""
    from ds_vlm.demo import build_model_dir

    if preset == "tiny":
        return build_model_dir(out, seed=seed)
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    config, tokenizer, processor = preset_config(preset)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16: half the memory, half the file
    try:
        model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    return out


# --------------------------------------------------------------------------- data

EXTRA_SENTENCES = ("The {shape} is {color}.", "It is a {color} {shape} on a light background.",
                   "There is one {shape} in the picture.", "Its colour is {color}.")
IMAGE_SIDE_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
MEAN_EXTRA_SENTENCES = 4.0
MAX_EXTRA_SENTENCES = 40


def build_shapes_data(out: Path, n: int, seed: int, side: int, varied: bool) -> Path:
    """Coloured-shape captions as JSONL + PNGs (the demo's layout). varied=False: every image side x side,
    one-sentence answers. varied=True: image width and height each drawn from side x (0.5, 0.75, 1, 1.5, 2),
    answers of 1 + k sentences, k ~ exponential with mean 4 (capped at 40): a long tail, as SFT data has."""
    from ds_vlm.demo import COLORS, PROMPT, SHAPES, caption, draw_shape

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        image = draw_shape(color, shape, rng, side)
        answer = caption(color, shape)
        if varied:
            width, height = (max(16, round(side * rng.choice(IMAGE_SIDE_FACTORS))) for _ in range(2))
            image = image.resize((width, height))
            extra = min(MAX_EXTRA_SENTENCES, int(rng.expovariate(1 / MEAN_EXTRA_SENTENCES)))
            answer = " ".join([answer] + [rng.choice(EXTRA_SENTENCES).format(color=color, shape=shape)
                                          for _ in range(extra)])
        rel = f"images/{i:05d}.png"
        image.save(out / rel)
        records.append({"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": answer}],
                        "images": [rel]})
    path = out / "train.jsonl"
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def build_train_data(preset: str, out: Path, n: int, seed: int = 0) -> Path:
    if preset == "tiny":
        from ds_vlm.demo import build_data_dir

        build_data_dir(out, n_train=n, n_test=8, seed=seed)  # the demo data itself
        return out / "train.jsonl"
    return build_shapes_data(out, n, seed, PRESETS[preset]["image_side"], varied=False)


# --------------------------------------------------------------------------- padding (no training)


def token_lengths(model_dir: Path, data: Path, max_length: int) -> list[int]:
    """Every record's token count (image tokens included) from the real processor and encoder."""
    from transformers import AutoConfig, AutoProcessor

    from ds_vlm.data.batching import RecordIndex
    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.preflight import check_records
    from ds_vlm.models import adapter_for

    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = adapter_for(AutoConfig.from_pretrained(model_dir).model_type)
    checks = check_records(RecordIndex(str(data)), Encoder(processor, adapter, max_length))
    bad = [c for c in checks if c.kind != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} record(s) of {data} do not encode: {bad[0].message}")
    return [c.n_tokens for c in checks]


def plan_cost(micro_batches: list[list[int]], lengths: list[int]) -> dict:
    """Tokens a forward computes (longest x count per micro-batch, padding included) against real ones."""
    batches = [mb for mb in micro_batches if mb]
    computed = sum(max(lengths[i] for i in mb) * len(mb) for mb in batches)
    real = sum(lengths[i] for mb in batches for i in mb)
    return {"micro_batches": len(batches), "samples": sum(len(mb) for mb in batches),
            "mean_samples_per_micro_batch": sum(len(mb) for mb in batches) / len(batches),
            "real_tokens": real, "computed_tokens": computed, "padding_efficiency": real / computed,
            "largest_micro_batch_tokens": max(max(lengths[i] for i in mb) * len(mb) for mb in batches)}


def default_token_budget(lengths: list[int], micro_batch_size: int) -> int:
    """micro_batch_size x the mean length (the fixed batches' real tokens per micro-batch), at least the
    longest sample (a valid --max_tokens_per_batch with --max_length >= the longest), rounded up to 64."""
    budget = max(micro_batch_size * sum(lengths) / len(lengths), max(lengths))
    return int(math.ceil(budget / 64) * 64)


def padding_report(lengths: list[int], micro_batch_size: int, world_size: int, max_tokens: int = 0,
                   seed: int = 42) -> dict:
    """Fixed micro-batches (BatchPlan) against token-budget ones (TokenBudgetPlan) over one epoch: the same
    samples, each once."""
    from ds_vlm.data.batching import BatchPlan, TokenBudgetPlan

    max_tokens = max_tokens or default_token_budget(lengths, micro_batch_size)
    common = dict(n_samples=len(lengths), micro_batch_size=micro_batch_size, grad_accum=1, world_size=world_size,
                  seed=seed)
    fixed = plan_cost(BatchPlan(**common).epoch_micro_batches(0), lengths)
    budget = plan_cost(TokenBudgetPlan(**common, lengths=lengths, max_tokens=max_tokens).epoch_micro_batches(0),
                       lengths)
    assert fixed["samples"] == budget["samples"] == len(lengths)
    saved = 1 - budget["computed_tokens"] / fixed["computed_tokens"]
    ordered = sorted(lengths)
    return {"records": len(lengths), "micro_batch_size": micro_batch_size, "world_size": world_size,
            "max_tokens_per_batch": max_tokens,
            "lengths": {"min": ordered[0], "median": ordered[len(ordered) // 2], "mean": sum(lengths) / len(lengths),
                        "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1]},
            "fixed": fixed, "token_budget": budget, "computed_tokens_saved": saved,
            "target": TOKEN_BUDGET_TARGET, "target_met": saved >= TOKEN_BUDGET_TARGET}


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(num_ranks: int, port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
            "--master_port", str(port)]


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce leaves one ~70 MB /dev/shm file per rank, named by the
    master address and port, after every run; remove those of our own run (they hold RAM, and a later run
    on the same port would open a stale one)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and hasattr(os, "getuid"):
        for path in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            try:
                path.unlink()
            except OSError:
                pass


def case_command(case: str, args, model: Path, data: Path, out: Path, port: int) -> list[str]:
    common = ["--model", str(model), "--train_data", str(data), "--output_dir", str(out), "--max_steps",
              str(args.steps), "--micro_batch_size", str(args.micro_batch_size), "--lr", str(args.lr),
              "--max_length", str(args.max_length), "--num_workers", str(args.num_workers),
              "--gradient_checkpointing", args.gradient_checkpointing, "--seed", str(args.seed)]
    if case.startswith("ds_zero"):
        return launcher(args.num_ranks, port) + [
            str(ROOT / "launch" / "train.py"), *common,
            "--deepspeed", str(ROOT / "ds_configs" / f"zero{case[-1]}.json"),
            "--grad_accum", "1", "--warmup_ratio", "0", "--export_hf", "false", "--resume", "none",
            *(["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else [])]
    if case.startswith("hf_zero"):
        return launcher(args.num_ranks, port) + [
            str(ROOT / "launch" / "bench_hf_trainer.py"), *common,
            "--deepspeed", str(ROOT / "ds_configs" / f"zero{case[-1]}.json")]
    if case == "plain":
        return [sys.executable, str(Path(__file__).resolve()), "plain-loop", *common,
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


def summarize(case: str, rows: list[dict], warmup: int, world: int, peak_tflops: float | None) -> dict:
    """Over the steps after `warmup`: the median step time, and samples/s and tokens/s as the median
    samples (tokens) per step over it (medians: robust to a busy shared machine)."""
    rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
    measured = [r for r in rows[warmup:] if r.get("step_time_s")]
    if not measured:
        return {"steps_logged": len(rows), "steps_measured": 0}
    ranks = 1 if case == "plain" else world
    times = [r["step_time_s"] for r in measured]
    step = statistics.median(times)
    out = {"steps_logged": len(rows), "steps_measured": len(measured), "s_per_step": step,
           "mean_s_per_step": sum(times) / len(times),
           "samples_per_step": statistics.median(r["samples"] for r in measured),
           "samples_per_s": statistics.median(r["samples"] for r in measured) / step,
           "tokens_per_s": statistics.median(r["tokens"] for r in measured) / step
           if all(r.get("tokens") is not None for r in measured) else None,
           "loss_first": rows[0].get("loss"), "loss_last": rows[-1].get("loss")}
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
        chosen["rounds_status"] = [r["status"] for r in results]
        chosen["rounds_failed"] = [{"round": i + 1, "status": r["status"], "log_tail": r.get("log_tail", [])}
                                   for i, r in enumerate(results) if r["status"] != "ok"]
        peaks = [r["peak_rss_gb"] for r in ok if r.get("peak_rss_gb")]
        chosen["peak_rss_gb"] = [max(p[i] for p in peaks) for i in range(min(map(len, peaks)))] if peaks else []
    return chosen


def plain_loop(argv: list[str]) -> int:
    """The reference: one process, the same model, the same global batches (BatchPlan with the benchmark's
    world size), one forward of the whole global batch per step, torch.optim.AdamW, clipping at 1.0."""
    import resource

    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.config import TrainConfig
    from ds_vlm.data.batching import BatchPlan, Collator, RecordIndex, SFTDataset
    from ds_vlm.data.encode import Encoder
    from ds_vlm.engine import set_trainable
    from ds_vlm.loss import LabelLoss, LabelRows
    from ds_vlm.models import adapter_for
    from ds_vlm.train import setup_threads

    parser = argparse.ArgumentParser(prog="bench.py plain-loop")
    for name, kind, default in (("model", str, None), ("train_data", str, None), ("output_dir", str, None),
                                ("max_steps", int, 30), ("micro_batch_size", int, 8), ("lr", float, 1e-4),
                                ("max_length", int, 4096), ("num_workers", int, 1), ("seed", int, 42),
                                ("world_size", int, 2), ("gradient_checkpointing", str, "false")):
        parser.add_argument(f"--{name}", type=kind, default=default, required=default is None)
    args = parser.parse_args(argv)
    os.environ.pop("LOCAL_SIZE", None)
    setup_threads()  # one process: all the cores
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    config = TrainConfig(model=args.model, train_data=args.train_data)
    adapter = adapter_for(AutoConfig.from_pretrained(args.model).model_type)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).to(device)
    getattr(model.config, "text_config", model.config).use_cache = False
    set_trainable(model, adapter, config)
    if args.gradient_checkpointing == "true":
        from ds_vlm.engine import enable_checkpointing

        enable_checkpointing(model, adapter, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    try:
        from ds_vlm.metrics import FlopsCounter

        flops_of = FlopsCounter(model, adapter.parts(model), config)
    except Exception:  # noqa: BLE001 - FLOPs are optional in the report
        flops_of = None
    label_loss = LabelLoss(model)
    processor = AutoProcessor.from_pretrained(args.model)
    encoder = Encoder(processor, adapter, args.max_length)
    dataset = SFTDataset(RecordIndex(args.train_data), encoder)
    plan = BatchPlan(len(dataset), args.micro_batch_size, 1, args.world_size, args.seed)
    batches = [plan.step_samples(step) for step in range(args.max_steps)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=Collator(encoder.tokenizer.pad_token_id,
                                                                            encoder.dummy()),
                        num_workers=args.num_workers, prefetch_factor=4 if args.num_workers else None,
                        worker_init_fn=(lambda _: torch.set_num_threads(1)) if args.num_workers else None)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "w", buffering=1) as log:
        last = time.perf_counter()
        for step, (batch, meta) in enumerate(loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            rows = LabelRows.from_labels(batch.pop("labels").cpu())
            flops = flops_of(batch, len(rows)) if flops_of is not None else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                summed = label_loss(model, batch, rows.to(device))
            (summed / meta["targets"]).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = summed.item() / meta["targets"]
            now = time.perf_counter()
            elapsed, last = now - last, now
            log.write(json.dumps({"step": step + 1, "loss": loss, "grad_norm": float(grad_norm),
                                  "step_time_s": elapsed, "samples": meta["samples"], "tokens": meta["tokens"],
                                  "computed": meta["computed"], "samples_per_s": meta["samples"] / elapsed,
                                  "tokens_per_s": meta["tokens"] / elapsed, "flops": flops,
                                  "peak_mem_gb": [torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda"
                                                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6]})
                      + "\n")
    return 0


# --------------------------------------------------------------------------- report

LABELS = {"ds_zero0": "ds-vlm ZeRO-0", "ds_zero1": "ds-vlm ZeRO-1", "ds_zero2": "ds-vlm ZeRO-2",
          "ds_zero3": "ds-vlm ZeRO-3", "plain": "plain PyTorch, 1 process", "hf_zero0": "HF Trainer ZeRO-0",
          "hf_zero2": "HF Trainer ZeRO-2", "hf_zero3": "HF Trainer ZeRO-3"}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


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
        status = "ok" if r["status"].startswith("ok") else (r["status"] if r["status"] in ("refused", "timeout")
                                                             else "failed")
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
                          (f"token budget {p['max_tokens_per_batch']}", "token_budget")):
            q = p[key]
            lines.append(f"{name:<38}{q['micro_batches']:>14}{q['mean_samples_per_micro_batch']:>11.1f}"
                         f"{q['real_tokens']:>10}{q['computed_tokens']:>13}{q['padding_efficiency']:>11.1%}"
                         f"{q['computed_tokens'] / p['fixed']['computed_tokens']:>9.2f}")
    if report.get("loss_memory"):
        from ds_vlm.bench import loss_memory

        lines += ["", loss_memory.render(report["loss_memory"])]
    lines += ["", "Targets:"]
    for target in report["targets"].values():
        verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[target["met"]]
        lines.append(f"  [{verdict}] {target['what']}: {target['measured']}")
    return "\n".join(lines)


def targets(report: dict) -> dict:
    ours, hf = report["cases"].get("ds_zero2", {}), report["cases"].get(REFERENCE, {})
    if ours.get("s_per_step") and hf.get("s_per_step"):
        ratio = hf["s_per_step"] / ours["s_per_step"]
        zero2 = {"met": ours["s_per_step"] <= hf["s_per_step"], "ratio": ratio,
                 "measured": f"{ours['s_per_step']:.4f} s/step vs {hf['s_per_step']:.4f} s/step "
                             f"(ds-vlm {ratio:.2f}x the Trainer's speed)"}
    else:
        zero2 = {"met": None, "measured": f"ds_zero2 {ours.get('status', 'not run')}, "
                                          f"{REFERENCE} {hf.get('status', 'not run')}"}
    zero2["what"] = "ds-vlm ZeRO-2 step no slower than the transformers Trainer's on the same json"
    p = report.get("padding")
    budget = {"what": f"token-budget batches compute >= {TOKEN_BUDGET_TARGET:.0%} fewer tokens than fixed ones",
              "met": p["target_met"] if p else None,
              "measured": f"{p['computed_tokens_saved']:.1%} fewer ({p['token_budget']['computed_tokens']} vs "
                          f"{p['fixed']['computed_tokens']})" if p else "not run"}
    out = {"zero2_vs_hf_trainer": zero2, "token_budget_padding": budget}
    if report.get("loss_memory"):
        from ds_vlm.bench import loss_memory

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
    parser.add_argument("--records", type=int, default=0, help="training records (0: the preset's, or enough for one pass)")
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
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all cases (a shared machine's load "
                                                                "drifts); each case reports its median round, "
                                                                "the faster one of 2")
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
    report = {"command": "python launch/bench.py " + shlex.join(argv), "preset": args.preset, "machine": machine(),
              "settings": {k: getattr(args, k) for k in ("num_ranks", "steps", "warmup", "micro_batch_size",
                                                         "num_workers", "gradient_checkpointing", "max_length",
                                                         "lr", "seed", "repeats")},
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
        from ds_vlm.metrics import device_peak_tflops

        peak = device_peak_tflops(args.peak_tflops)
    except ImportError:
        pass

    # -- training cases ----------------------------------------------------------------------
    available = available_memory_gb(gpu)
    runnable = []
    for case in sorted(cases, key=RUN_ORDER.index):
        need = memory_estimate_gb(n_params, n_trainable, case, args.num_ranks, gpu)
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
        for case in runnable:
            out = work / "runs" / (case if args.repeats == 1 else f"{case}_{round_no + 1}")
            print(f"[bench] {case}: running ({args.steps} steps)"
                  + (f", round {round_no + 1}/{args.repeats}" if args.repeats > 1 else ""), flush=True)
            port = free_port()
            try:
                result = run_case(case, case_command(case, args, model_dir, data, out, port), out, args.case_timeout)
            finally:
                remove_shm_buffers(port)
            rows = step_rows(case, out, args.num_ranks)
            if result["status"] != "ok" and len({r["step"] for r in rows}) >= args.steps:
                # every step ran and was logged; the processes failed on the way out (seen: exit 250 = a rank's
                # SIGABRT at shutdown on this shared CPU). The step times stand; the status says what happened.
                result["status"] = f"ok, then {result['status']} at shutdown"
            if result["status"].startswith("ok"):
                result.update(summarize(case, rows, args.warmup, args.num_ranks, peak))
                if case.startswith("hf_zero"):
                    result.update(hf_extras(out, args.num_ranks))
            rounds[case].append(result)
            print(f"[bench] {case}: {result['status']}, {_fmt(result.get('samples_per_s'), '.1f')} samples/s, "
                  f"{_fmt(result.get('s_per_step'), '.4f')} s/step, peak RSS {result.get('peak_rss_gb')} GB, "
                  f"{result['wall_s']:.0f} s", flush=True)
    for case, results in rounds.items():
        report["cases"][case] = combine_rounds(results)

    # -- padding: fixed vs token-budget micro-batches, no training -----------------------------
    print(f"[bench] padding: encoding {args.padding_records} varied-length records", flush=True)
    varied = build_shapes_data(work / "varied", args.padding_records, args.seed, PRESETS[args.preset]["image_side"],
                               varied=True)
    lengths = token_lengths(model_dir, varied, max_length=100_000)
    report["padding"] = padding_report(lengths, args.micro_batch_size, args.num_ranks, args.max_tokens_per_batch,
                                       args.seed)

    # -- the loss's memory: full logits against logits at label rows, no training -------------------
    if args.loss_memory_tokens:
        from ds_vlm.bench import loss_memory

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
