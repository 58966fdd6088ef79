"""The GPU check's stages (gpu_check.py runs each in its own process): each returns its detail, or raises.

The training stages run the trainer as users do, `deepspeed --num_gpus 1 launch/train.py` (the launcher as
`python -m deepspeed.launcher.runner`, which the `deepspeed` script is), on the small model and data that
gpu_check.prepare built in the work folder. With DS_VLM_GPU_CHECK_RANKS naming a script that takes
tests/scripts/ranks.py's command line (`N PORT SCRIPT ARGS...`), that script starts the ranks instead: the test
suite's dry run does so, to start its ranks from the session's pre-imported zygote (the launcher itself is
tested in tests/dist/test_launch.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_common import ROOT, TRAIN_FLAGS, stage_env
from ds_vlm.runtime.distributed import free_port


class StageFailed(RuntimeError):
    pass


def _train(work: Path, name: str, zero: str, *extra: str, timeout: float = 600, resume: bool = False) -> dict:
    """One run of the real entry; its metrics, what it said it runs on, and its output folder. A run already
    made in this work folder (another stage's) is read, not repeated; `resume`: the folder holds a checkpoint
    to go on from."""
    out = work / name
    log = work / f"{name}.train.log"
    if not (out / "metrics.jsonl").exists() or not log.exists():
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        starter = os.environ.get("DS_VLM_GPU_CHECK_RANKS")  # the test suite's dry run: its own rank starter
        launcher = ([sys.executable, starter, "1", str(free_port())] if starter else
                    [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                     str(free_port())])
        cmd = [*launcher, str(ROOT / "launch" / "train.py"), "--model", str(work / "model"),
               "--train_data", str(work / "data" / "train.jsonl"), "--deepspeed",
               str(ROOT / "ds_configs" / f"zero{zero}.json"), "--output_dir", str(out), *TRAIN_FLAGS, *extra]
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=stage_env(), timeout=timeout)
        if proc.returncode != 0:
            raise StageFailed(f"{name}: the run exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
    text = log.read_text(errors="replace")
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and "event" not in r]
    said = re.search(r"optimizer (.+?); attention (.+)", text)
    backend = re.search(r"backend (\w+)", text)
    return {"out": out, "rows": rows, "log": text, "detail": {
        "losses": [r["loss"] for r in rows], "step_time_s": [round(r["step_time_s"], 4) for r in rows],
        "peak_mem_gb": rows[-1]["peak_mem_gb"] if rows else None,
        "peak_reserved_gb": rows[-1].get("peak_reserved_gb") if rows else None,
        "optimizer": said[1] if said else None, "attention": said[2].strip() if said else None,
        "backend": backend[1] if backend else None}}


def _check_trained(run: dict, steps: int = 4) -> dict:
    import math

    losses = run["detail"]["losses"]
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        raise StageFailed(f"expected {steps} finite losses, got {losses}")
    return run["detail"]


# what every stage needs, and what some do (a missing optional one skips its stage)
REQUIRED = ("torch", "deepspeed", "transformers", "accelerate", "peft", "safetensors", "tokenizers", "PIL",
            "rouge_score", "nltk", "regex", "sacrebleu", "matplotlib", "psutil", "yaml")
OPTIONAL = ("bitsandbytes", "liger_kernel", "fla", "causal_conv1d", "flash_attn", "av", "triton")


def imports(work: Path, dry_run: bool) -> dict:
    """The versions found (and the GPU); every required module imports (transformers checks regex's version at
    import: a too old one fails here, not at the first evaluation)."""
    import importlib
    import importlib.metadata

    import torch

    found, failed = {}, {}
    for name in REQUIRED + OPTIONAL:
        try:
            module = importlib.import_module(name)
            found[name] = getattr(module, "__version__", None) or _distribution_version(name)
        except Exception as err:  # noqa: BLE001 - ImportError, or a wheel for another torch/CUDA
            found[name] = None
            if name in REQUIRED:
                failed[name] = f"{type(err).__name__}: {str(err)[:300]}"
    cuda = torch.cuda.is_available()
    detail = {"versions": found, "python": sys.version.split()[0], "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name() if cuda else None,
              "capability": list(torch.cuda.get_device_capability()) if cuda else None,
              "nvcc": shutil.which("nvcc")}
    print(json.dumps(detail, indent=1), flush=True)
    if failed:
        raise StageFailed(f"required modules do not import: {failed}")
    return detail


def _distribution_version(module: str):
    import importlib.metadata

    names = {"PIL": "pillow", "yaml": "pyyaml", "rouge_score": "rouge-score", "fla": "flash-linear-attention"}
    for name in (names.get(module, module), module.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def train_zero2(work: Path, dry_run: bool) -> dict:
    return _check_trained(_train(work, "zero2", "2"))


def eval_stage(work: Path, dry_run: bool) -> dict:
    """A ZeRO-3 run with --eval_data: the eval loss, greedy answers to 2 held-out records, their scores
    (exact match, BLEU, chrF, ROUGE-L) and the HTML report, as a user's run makes them at its end."""
    run = _train(work, "zero3_eval", "3", "--eval_data", str(work / "data" / "test.jsonl"), "--eval_generate", "2")
    detail = _check_trained(run)
    events = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e.get("event") == "eval"]
    if not evals:
        raise StageFailed("no eval event in metrics.jsonl:\n" + run["log"][-2000:])
    last = evals[-1]
    report = run["out"] / "eval" / f"step_{last['step']}.html"
    missing = [k for k in ("eval_loss", "exact_match", "bleu", "chrf", "rouge_l") if k not in last]
    if missing or not report.is_file():
        raise StageFailed(f"the evaluation lacks {missing or ''} {'' if report.is_file() else f'{report} is missing'}")
    samples = run["out"] / "samples.jsonl"
    detail.update({k: last[k] for k in ("eval_loss", "exact_match", "bleu", "chrf", "rouge_l")},
                  report=str(report), report_bytes=report.stat().st_size,
                  answers=len(samples.read_text().splitlines()) if samples.exists() else 0)
    return detail


def save_resume(work: Path, dry_run: bool) -> dict:
    """train_zero2's run saved at steps 2 and 4; its copy without step 4 resumes from 2: the same losses."""
    whole = _train(work, "zero2", "2")
    resumed_dir = work / "resumed"
    shutil.rmtree(resumed_dir, ignore_errors=True)
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole["out"] / "checkpoints" / "step_00000002", resumed_dir / "checkpoints" / "step_00000002")
    (resumed_dir / "checkpoints" / "latest").write_text("step_00000002")
    (work / "resumed.train.log").unlink(missing_ok=True)
    resumed = _train(work, "resumed", "2", "--export_hf", "false", resume=True)
    if "resumed from" not in resumed["log"]:
        raise StageFailed("the second run did not resume:\n" + resumed["log"][-2000:])
    first, second = whole["detail"]["losses"][2:], resumed["detail"]["losses"]
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(first, second))
    if len(second) != 2 or worst > 1e-5:
        raise StageFailed(f"steps 3-4: uninterrupted {first}, resumed {second} (rel difference {worst:.2e})")
    return {"uninterrupted": first, "resumed": second, "max_rel_difference": worst}


def export(work: Path, dry_run: bool) -> dict:
    """train_zero2's hf/ with plain from_pretrained, then a greedy answer to a held-out record."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.eval.generation import generate_answers

    hf = _train(work, "zero2", "2")["out"] / "hf"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(hf, dtype=torch.bfloat16 if device == "cuda" else None)
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(hf)
    samples = [RecordIndex([str(work / "data" / "test.jsonl")]).sample(0)]
    answer = generate_answers(model, processor, samples, max_new_tokens=8)[0]
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return {"hf": str(hf), "answer": answer, "dtypes": dtypes, "parameters": sum(p.numel() for p in model.parameters())}


def _lora_run(work: Path, name: str, *extra: str) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    run = _train(work, name, "2", "--lora_rank", "8", "--lora_alpha", "16", *extra)
    detail = _check_trained(run)
    out = run["out"]
    for folder in ("hf", "adapter"):
        if not (out / folder).is_dir():
            raise StageFailed(f"no {folder}/ folder in {out}")
    config = json.loads((out / "hf" / "config.json").read_text())
    if "quantization_config" in config:
        raise StageFailed("the merged export's config still says it is quantized")
    merged = AutoModelForImageTextToText.from_pretrained(out / "hf")
    detail.update(merged_dtypes=sorted({str(p.dtype) for p in merged.parameters()}),
                  adapter_files=sorted(p.name for p in (out / "adapter").iterdir()))
    if any(not p.is_floating_point() for p in merged.parameters()):
        raise StageFailed(f"the merged export holds integer weights: {detail['merged_dtypes']}")
    del merged
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return detail


def lora(work: Path, dry_run: bool) -> dict:
    return _lora_run(work, "lora")


def qlora(work: Path, dry_run: bool) -> dict:
    """The LoRA stage's run with 4-bit base weights; its merged export against the base model (qlora_export)."""
    detail = _lora_run(work, "qlora", "--lora_bits", "4")
    return {**detail, **qlora_export(work / "model", work / "qlora")}


def qlora_export(base_dir: Path, run_dir: Path) -> dict:
    """What a QLoRA run's merged export (RUN/hf, beside RUN/adapter) must hold against its base model: the frozen
    vision tower bit-identical (it was never quantized), the projector trained (every tensor changed, floating
    point), each LoRA target of the language tower merged into its dequantized 4-bit weight (hf - B A x alpha/r
    equals the base rounded through NF4, not the base itself), the rest of the language tower as in the base, no
    integer weights and no quantization config. Raises StageFailed; returns counts."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ds_vlm.models import adapter_for

    def weights(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    base, merged, adapter = weights(base_dir), weights(run_dir / "hf"), weights(run_dir / "adapter")
    lora = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    config = AutoConfig.from_pretrained(run_dir / "hf")
    if hasattr(config, "quantization_config"):
        raise StageFailed("the merged export's config still says it is quantized")
    if base.keys() != merged.keys():
        raise StageFailed(f"keys differ from the base model's: {sorted(base.keys() ^ merged.keys())[:5]}")
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    parts, names = adapter_for(config.model_type).parts(skeleton), {id(m): n for n, m in skeleton.named_modules()}

    def under(modules) -> set:
        roots = [names[id(m)] + "." for m in modules]
        return {k for k in base if any(k.startswith(r) for r in roots)}

    vision, projector = under(parts.vision), under(parts.projector)
    head = skeleton.get_output_embeddings()
    quantized = {f"{names[id(m)]}.weight" for root in parts.llm for m in root.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head}  # NF4-rounded, LoRA or not
    targets = {f"{t}.weight" for t in lora["target_modules"]}
    problems = [f"{k}: {merged[k].dtype}" for k in merged if not merged[k].is_floating_point()]
    problems += [f"vision {k} differs from the base" for k in sorted(vision) if not torch.equal(merged[k], base[k])]
    problems += [f"projector {k} did not train" for k in sorted(projector) if torch.equal(merged[k], base[k])]
    rest = set(base) - vision - projector - targets
    problems += [f"{k} differs from the base" for k in sorted(rest - quantized) if not torch.equal(merged[k], base[k])]
    scale = lora["lora_alpha"] / lora["r"]
    problems += [p for key in sorted(targets) if (p := _merge_problem(key, base[key], merged[key], adapter, scale))]
    if not vision or not projector or not targets:
        problems.append(f"parts found: vision {len(vision)}, projector {len(projector)}, targets {len(targets)}")
    if problems:
        raise StageFailed("the merged QLoRA export: " + "; ".join(problems[:8]))
    return {"vision_identical": len(vision), "projector_trained": len(projector), "merged_targets": len(targets)}


def _merge_problem(key: str, base, merged, adapter: dict, scale: float) -> str:
    """Why `merged` is not `base` rounded through 4-bit NF4 (in the run's dtype, as the run loaded it) plus its
    LoRA product B A x `scale`, or "". Exact on a CPU in fp32; allowed: a tenth of what the NF4 rounding moved,
    or two of the export dtype's rounding steps (bf16), whichever is larger. Merging into the unrounded base
    misses by the whole NF4 rounding."""
    import bitsandbytes.functional as bnb_functional
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = key.removesuffix(".weight")
    a, b = (adapter[f"base_model.model.{module}.lora_{x}.weight"].to(device, torch.float32) for x in "AB")
    packed, state = bnb_functional.quantize_4bit(base.to(device, merged.dtype), blocksize=64,
                                                 compress_statistics=True, quant_type="nf4")
    rounded = bnb_functional.dequantize_4bit(packed, state).float()
    full = merged.to(device, torch.float32)
    if torch.equal(full, rounded):
        return f"{key}: its LoRA changed nothing"
    error = float((full - b @ a * scale - rounded).abs().max())
    moved = float((rounded - base.to(device, torch.float32)).abs().max())
    allowed = max(0.1 * moved, 2 * torch.finfo(merged.dtype).eps * float(full.abs().max()))
    return "" if error <= allowed else \
        f"{key}: not the 4-bit base + LoRA (off by {error:.2e}, allowed {allowed:.2e}; NF4 rounding {moved:.2e})"


def liger(work: Path, dry_run: bool) -> dict:
    """liger-kernel's fused loss against the chunked one, at Qwen's head (2048 x 151,936, bf16) and 2,048 label
    rows: loss and both gradients."""
    import torch

    from ds_vlm.train.loss import chunked_loss_sum, liger_loss_sum

    torch.manual_seed(0)
    hidden = (torch.randn(2048, 2048, device="cuda") * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(151_936, 2048, device="cuda") * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, 151_936, (2048,), device="cuda")
    results = {}
    for name, fn in (("chunked", chunked_loss_sum), ("liger", liger_loss_sum)):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, None, targets)
        (loss * 0.5).backward()  # a scaled loss, as the trainer's always is
        results[name] = (loss.detach().float(), hidden.grad.float(), weight.grad.float())
    (la, ha, wa), (lb, hb, wb) = results["chunked"], results["liger"]
    rel = {"loss": float((la - lb).abs() / la.abs()),
           "grad_hidden": float((ha - hb).norm() / ha.norm()), "grad_weight": float((wa - wb).norm() / wa.norm())}
    if max(rel.values()) > 2e-2:
        raise StageFailed(f"liger differs from the chunked loss: {rel}")
    return {"relative_difference": rel, "loss": float(la)}


def sweep_2b(work: Path, dry_run: bool) -> dict:
    from benchmarks.gpu_sweep import sweep

    if dry_run:
        return sweep(preset="tiny", sizes=[64, 400], steps=1, answer_sentences=2)
    return sweep(preset="2b", sizes=[8192, 32768, 65536], steps=2)  # 65,536: the reference recipe's packed row


def plan(work: Path, dry_run: bool) -> dict:
    """`python -m ds_vlm.plan` at the sweep's sizes (its model's config and processor, its sample, ZeRO-2 on one
    rank, packed) against the peak each size measured: max_memory_allocated over a step on CUDA (on the dry
    run's CPU, the live-tensor meter of --measure_memory). Fails on a GPU when a size is off by more than 10%.
    Reads sweep_2b's result from the work folder when that stage ran, else runs the sweep."""
    from ds_vlm.memplan.planner import plan as make_plan

    done = work / "sweep_2b.json"
    result = json.loads(done.read_text()) if done.exists() else sweep_2b(work, dry_run)
    rows = []
    for row in (r for r in result["rows"] if r["status"] == "ok"):
        argv = ["--model", result["model_dir"], "--train_data", result["record"], "--deepspeed",
                str(ROOT / "ds_configs" / "zero2.json"), "--world_size", "1", "--device", "cpu" if dry_run else "cuda",
                "--gpu_memory_gb", "1000", "--packing", "--max_length", str(result["sample_tokens"]),
                "--max_tokens_per_batch", str(row["tokens"]), "--data_cache", str(work / "plan_cache"),
                "--max_pixels", str(result.get("max_pixels", 0))]
        report = make_plan(argv)
        if report is None:
            raise StageFailed(f"the planner refused: {argv}")
        measured = row.get("peak_tensor_gb")
        rows.append({"tokens": row["tokens"], "planned_gb": round(report["peak_gb_per_rank"], 3),
                     "measured_gb": measured, "ratio": round(report["peak_gb_per_rank"] / measured, 3)
                     if measured else None, "seconds_to_plan": report["seconds_to_plan"]})
    off = [r for r in rows if r["ratio"] is not None and abs(r["ratio"] - 1) > 0.10]
    if off and not dry_run:
        raise StageFailed(f"planned/measured off by more than 10%: {off}")
    return {"rows": rows}


def deepspeed_features(work: Path, dry_run: bool) -> dict:
    """ds_configs/zero3pp.json on the GPU (its "auto" values: quantized weights and gradients on; hpZ off on one
    node), and Muon under ZeRO-2 in bf16 (Newton-Schulz compiled): 4 finite losses each, zero3pp's within 5% of
    train_zero3's (the same batches; quantization is the difference). Expert parallelism needs 2 ranks: not
    here (tests/dist/test_expert.py runs it on CPU ranks)."""
    plain = _check_trained(_train(work, "zero3", "3"))["losses"]
    pp = _train(work, "zero3pp", "3pp", "--export_hf", "false")
    quantized = re.search(r'"zero_quantized_weights": (true|false)', (pp["out"] / "run_config.json").read_text())
    pp_losses = _check_trained(pp)["losses"]
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain, pp_losses))
    if worst > 0.05:
        raise StageFailed(f"zero3pp losses {pp_losses} against ZeRO-3's {plain} (rel difference {worst:.2e})")
    muon = _train(work, "muon", "2", "--optimizer", "muon", "--export_hf", "false")
    if not (muon["detail"]["optimizer"] or "").startswith("DeepSpeed Muon"):
        raise StageFailed(f"the Muon run said optimizer {muon['detail']['optimizer']!r}")
    return {"zero3pp_losses": pp_losses, "zero3_losses": plain, "max_rel_difference": worst,
            "quantized_weights": quantized[1] if quantized else None, "muon": _check_trained(muon)}


STAGE_FUNCTIONS = {"imports": imports, "train_zero2": train_zero2, "save_resume": save_resume, "export": export,
                   "eval": eval_stage, "qlora": qlora, "lora": lora, "liger": liger, "sweep_2b": sweep_2b, "plan": plan,
                   "deepspeed_features": deepspeed_features}
