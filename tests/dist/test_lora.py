"""LoRA on 2 ranks under ZeRO-3, on Qwen3-VL and on Qwen3.5 (its linear-attention projections among the targets):
only adapters change, small checkpoints and exact resume, merged and peft exports agree. QLoRA on 2 ranks under
ZeRO-2, on the CPU (bitsandbytes' 4-bit NF4 runs there): its merged export against the base model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.runs import ROOT, launch_and_kill_after, read_metrics, run_train

from ds_vlm.checkpoint.meta import HF_CONFIG, read_meta
from ds_vlm.checkpoint.resume import find_checkpoint

STEPS = 6
# LoRA targets by default: the attention and MLP projections of each layer (Qwen3.5: 3 linear-attention
# layers x (in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj + 3 MLP) and 1 full-attention layer x 7)
TARGETS = {"qwen3_vl": 2 * 7, "qwen3_5": 3 * 8 + 7}


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--train_data", str(data), "--deepspeed",
            str(ROOT / "ds_configs" / "zero3.json"), "--output_dir", str(out), "--max_steps", str(STEPS),
            "--micro_batch_size", "2", "--lr", "2e-3", "--warmup_ratio", "0", "--num_workers", "0", "--save_steps", "2",
            "--lora_rank", "8", "--train_projector", "false", "--dist_timeout_s", "120", *extra]


@pytest.fixture(scope="module", params=list(TARGETS))
def lora_run(request, family_models, mixed_data, tmp_path_factory):
    """(family, its tiny model, the run's output folder)."""
    family, model_dir = request.param, family_models(request.param)
    out = tmp_path_factory.mktemp(f"lora_{family}") / "run"
    proc = run_train(_args(model_dir, mixed_data, out))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return family, model_dir, out


def test_only_the_adapters_change(lora_run):
    from safetensors.torch import load_file

    family, model_dir, lora_run = lora_run
    rows = read_metrics(lora_run)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, [r["loss"] for r in rows]
    before = load_file(model_dir / "model.safetensors")
    after = load_file(lora_run / "hf" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    targets = {f"{m}.weight" for m in adapter["target_modules"]}
    assert len(targets) == TARGETS[family] and not adapter["modules_to_save"]  # nothing else trains
    assert changed == targets  # the LoRA-merged projections only


def test_checkpoints_hold_what_trains_and_resume_exactly(lora_run, mixed_data, tmp_path):
    """A full checkpoint holds fp32 weights and two Adam moments of every trained parameter (12 bytes each); this
    one holds the adapters' only: under a tenth of the model's 12 bytes a parameter (a fifth for Qwen3.5). Killed
    at step 3 and resumed from step 2, the run's later losses are the uninterrupted run's."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    family, model_dir, lora_run = lora_run
    checkpoint = find_checkpoint(str(lora_run))
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    n_params = sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())
    # Qwen3.5's tiny model is mostly the projections LoRA targets (5 per linear-attention layer): a fifth there
    assert size < (0.2 if family == "qwen3_5" else 0.1) * 12 * n_params, (size, n_params)
    assert AutoConfig.from_pretrained(checkpoint / HF_CONFIG).model_type == family
    out = tmp_path / "run"
    launch_and_kill_after(_args(model_dir, mixed_data, out), step=3)
    resumed = find_checkpoint(str(out))
    proc = run_train(_args(model_dir, mixed_data, out))
    assert proc.returncode == 0, proc.stderr[-5000:]
    start = read_meta(resumed).step
    assert f"resumed from {resumed} at step {start}" in proc.stderr
    expected = {r["step"]: r["loss"] for r in read_metrics(lora_run)}
    got = {r["step"]: r["loss"] for r in read_metrics(out)}
    for step in range(start + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)


def test_merged_export_answers_as_the_base_model_with_the_adapter(lora_run, demo_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.eval.generation import generate_answers

    _, model_dir, lora_run = lora_run
    merged = AutoModelForImageTextToText.from_pretrained(lora_run / "hf", dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    processor = AutoProcessor.from_pretrained(lora_run / "hf")
    samples = [RecordIndex([str(demo_dir / "data" / "test.jsonl")]).sample(i) for i in range(4)]
    assert generate_answers(merged, processor, samples, max_new_tokens=8) == \
        generate_answers(with_adapter, processor, samples, max_new_tokens=8)
    batch = processor(text=["What is in this picture?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, with_adapter(**batch).logits, rtol=1e-4, atol=1e-5)
    # the offline export of the same checkpoint: the base from --model, the adapters from the checkpoint
    out = tmp_path / "offline"
    proc = subprocess.run([sys.executable, "-m", "ds_vlm.export", str(lora_run), str(out), "--dtype", "fp32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    live, offline = load_file(lora_run / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)
    assert (Path(f"{out}-adapter") / "adapter_model.safetensors").is_file()


def test_qlora_trains_on_the_cpu_and_merges_into_the_4bit_base(demo_dir, tmp_path):
    """--lora_bits 4 on 2 CPU ranks under ZeRO-2 (ZeRO-3 refuses 4-bit weights), the projector trained beside the
    language tower's LoRA: the loss falls; the merged export keeps the vision tower bit-identical to the base, the
    projector trained, the LoRA targets merged into their dequantized NF4 weights (the GPU check's own test,
    gpu_stages.qlora_export); the offline export of its checkpoint writes the same weights."""
    from safetensors.torch import load_file

    from benchmarks.gpu_stages import qlora_export
    from ds_vlm.checkpoint.export import export

    out = tmp_path / "run"
    proc = run_train(["--model", str(demo_dir / "model"), "--train_data", str(demo_dir / "data" / "train.jsonl"),
                      "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out),
                      "--max_steps", "4", "--micro_batch_size", "2", "--lr", "2e-3", "--warmup_ratio", "0",
                      "--num_workers", "0", "--lora_rank", "8", "--lora_bits", "4", "--dist_timeout_s", "120"])
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = read_metrics(out)
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert qlora_export(demo_dir / "model", out) == {"vision_identical": 27, "projector_trained": 12,
                                                     "merged_targets": 14}
    export(str(out), str(tmp_path / "offline"), dtype="fp32")
    live, offline = load_file(out / "hf" / "model.safetensors"), load_file(tmp_path / "offline" / "model.safetensors")
    assert live.keys() == offline.keys() and [k for k in live if not torch.equal(live[k], offline[k])] == []
