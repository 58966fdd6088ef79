"""Real training runs on CPU ranks: every ds json on mixed image/text batches, ZeRO-3 with a frozen vision tower, what
a run reports, the HF export, bad data stopping a run, every format end to end, validate."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.datasets import write_bad_set, write_json
from fixtures.runs import ROOT, read_metrics, run_train, train_env

from ds_vlm.data.plan import BatchPlan
from ds_vlm.data.sources import RecordIndex

DS_CONFIGS = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
# the family each ds json trains: the demo's Qwen3-VL, and the Qwen3.5 families on the stages their own ZeRO-3
# runs (dist/test_families.py) do not reach
FAMILY_OF = {"zero0.json": "qwen3_5_moe", "zero1.json": "qwen3_5", "zero2.json": "qwen3_5"}


STEPS, MICRO = 8, 2


def _common(model: Path, data: Path, out: Path, ds: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--train_data", str(data), "--deepspeed", str(ds), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--micro_batch_size", str(MICRO), "--lr", "2e-3", "--warmup_ratio", "0",
            "--num_workers", "0", "--dist_timeout_s", "120", *extra]


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _mixed_steps(data: Path, micro: int, world: int = 2) -> int:
    """Steps in which one rank's micro-batch has no image while the other's has one."""
    records = RecordIndex([str(data)])
    has_image = [bool(records.sample(i).images) for i in range(len(records))]
    plan = BatchPlan(len(records), micro, 1, world, seed=42)
    count = 0
    for step in range(STEPS):
        flags = [any(has_image[i] for i in plan.micro_batches(step, r)[0]) for r in range(world)]
        count += len(set(flags)) == 2
    return count


@pytest.mark.parametrize("ds_name", DS_CONFIGS)
def test_each_ds_config_trains_two_ranks_on_mixed_batches(ds_name, family_models, mixed_data, tmp_path):
    """Vision tower trained, half the records text-only: every ZeRO stage must train, not hang."""
    data = mixed_data.with_suffix(".parquet") if ds_name in ("zero0.json", "zero1.json") else mixed_data
    assert _mixed_steps(mixed_data, MICRO) > 0
    out = tmp_path / "run"
    proc = run_train(_common(family_models(FAMILY_OF.get(ds_name, "qwen3_vl")), data, out,
                             ROOT / "ds_configs" / ds_name, "--train_vision", "all", "--export_hf", "false"))
    _assert_ok(proc)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"):
        assert all(r[key] is not None for r in rows), key
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.5, [r["loss"] for r in rows]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


@pytest.fixture(scope="module")
def frozen_zero3_run(demo_dir, mixed_data, tmp_path_factory):
    """ZeRO-3 with every parameter partitioned, vision frozen, mixed image/text batches, HF export."""
    tmp = tmp_path_factory.mktemp("z3frozen")
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_path = write_json(tmp / "zero3_all_partitioned.json", ds)
    out = tmp / "run"
    micro = 1
    assert _mixed_steps(mixed_data, micro) > 0
    args = _common(demo_dir / "model", mixed_data, out, ds_path, "--micro_batch_size", str(micro),
                   "--eval_data", str(demo_dir / "data" / "test.jsonl"), "--eval_steps", "4", "--eval_generate", "2")
    proc = run_train(args)
    _assert_ok(proc)
    return out, proc


def test_zero3_frozen_vision_mixed_batches(frozen_zero3_run):
    out, proc = frozen_zero3_run
    rows = read_metrics(out)
    assert len(rows) == STEPS and rows[-1]["loss"] < rows[0]["loss"]
    assert "eval loss" in proc.stderr


def test_the_console_says_each_thing_once(frozen_zero3_run):
    """Two ranks, an eval, an export: read top to bottom, no line is repeated (no warning once per rank, no
    bar redrawn into the log: stderr is not a terminal here, so progress is a line every 5%), and few lines
    come before the first step."""
    _, proc = frozen_zero3_run
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    assert not any("\r" in line for line in lines)
    first_step = next(i for i, line in enumerate(lines) if line.startswith("train: step "))
    assert first_step <= 12, lines[:first_step + 1]
    assert lines[0].startswith("ds-vlm: starting 2 rank(s): rendezvous, loading "), lines[:3]
    assert any(line.startswith("plan: predicted peak ") for line in lines[:first_step]), lines[:first_step]


def test_run_reports_evals_samples_mfu_memory_and_curves(frozen_zero3_run):
    from PIL import Image

    out, _ = frozen_zero3_run
    rows = read_metrics(out)
    assert all(r["mfu"] is None and r["tflops_per_gpu"] > 0 for r in rows)  # CPU: no peak, so no MFU
    # per rank: the imports alone are ~0.8 GB of RSS; a 0.4 M-parameter model must not add more than ~1 GB
    assert all(len(r["peak_mem_gb"]) == 2 and 0.3 < min(r["peak_mem_gb"]) <= max(r["peak_mem_gb"]) < 2.0
               for r in rows), [r["peak_mem_gb"] for r in rows]
    assert all(0 < r["padding_efficiency"] <= 1 for r in rows)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e.get("event") == "eval"]
    assert [e["step"] for e in evals] == [4, STEPS] and all(e["eval_loss"] > 0 for e in evals)
    assert all(0 <= e["exact_match"] <= 1 and 0 <= e["bleu"] <= 100 and 0 <= e["chrf"] <= 100
               and 0 <= e["rouge_l"] <= 1 for e in evals), evals  # caption scores, logged
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4, 4, STEPS, STEPS]
    assert all(s["reference"].startswith("A ") and isinstance(s["answer"], str) and "chrf" in s for s in samples)
    for step in (4, STEPS):  # the report of each evaluation: two answers, their images embedded
        page = (out / "eval" / f"step_{step}.html").read_text()
        assert page.count("<img class='thumb'") == 2 and page.count("src='data:image/png;base64,") >= 2
    curves = Image.open(out / "curves.png")  # matplotlib's: 3 x 2 panels
    assert curves.size == (1170, 900)
    # the last evaluation's page embeds the curves drawn with its own scores: the run's final curves.png
    page = (out / "eval" / f"step_{STEPS}.html").read_text()
    embedded = page.split("alt='training curves' src='data:image/png;base64,")[1].split("'")[0]
    embedded = Image.open(io.BytesIO(base64.b64decode(embedded))).convert("RGB")
    assert np.array_equal(np.asarray(embedded), np.asarray(curves.convert("RGB")))


def test_hf_export_reloads_generates_and_keeps_frozen_weights(frozen_zero3_run, demo_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.eval.generation import generate_answers

    out, _ = frozen_zero3_run
    hf = out / "hf"
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()
    before = load_file(demo_dir / "model" / "model.safetensors")
    after = load_file(hf / "model.safetensors")
    vision = [k for k in before if ".visual." in k and ".merger" not in k and "deepstack_merger" not in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # frozen: bit-identical, exported
    llm = [k for k in before if "language_model.layers" in k]
    assert any(not torch.equal(before[k], after[k]) for k in llm)  # trained: changed
    model = AutoModelForImageTextToText.from_pretrained(hf)
    processor = AutoProcessor.from_pretrained(hf)
    sample = RecordIndex([str(demo_dir / "data" / "test.jsonl")]).sample(0)
    answers = generate_answers(model, processor, [sample], max_new_tokens=8)
    assert isinstance(answers[0], str) and len(answers[0]) > 0
    assert json.loads((hf / "config.json").read_text())["model_type"] == "qwen3_vl"


def test_bad_data_stops_the_run_before_training(demo_dir, tmp_path):
    good = json.loads((demo_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    good["images"] = [str(demo_dir / "data" / good["images"][0])]
    rows = [good] * 6 + [{**good, "images": [str(tmp_path / "gone.png")]}] + [good] * 3
    data = tmp_path / "with_missing.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = run_train(_common(demo_dir / "model", data, out, ROOT / "ds_configs" / "zero2.json"))
    assert proc.returncode != 0
    assert f"{data} record 6: missing_image: image file {tmp_path / 'gone.png'} does not exist" in proc.stderr
    assert "--bad_records skip" in proc.stderr
    assert read_metrics(out) == []  # stopped before the first step

    proc = run_train(_common(demo_dir / "model", data, out, ROOT / "ds_configs" / "zero2.json",
                             "--bad_records", "skip", "--max_steps", "2", "--export_hf", "false"))
    _assert_ok(proc)
    assert "records: ok 9, missing_image 1" in proc.stderr
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "skipped_records", "count": 1} .items() <= next(e for e in events if "event" in e).items()


def test_a_missing_data_file_is_said_before_the_model_loads(tmp_path):
    """`ds-vlm train` with a data file that does not exist: the error names it before the model loads (a model
    path that does not exist either is never reached), no output folder is left behind, no file left open."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-X", "dev", "-c", "import sys; from ds_vlm.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "--model", str(tmp_path / "no_model"), "--train_data",
                           str(tmp_path / "missing.jsonl"), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
                           "--output_dir", str(out)], cwd=ROOT, env=dict(train_env(), PYTHONWARNINGS="default"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"ds-vlm: error: data file {tmp_path / 'missing.jsonl'} does not exist" in proc.stderr
    assert "no_model" not in proc.stderr.split("ds-vlm: error:")[1] and "Traceback" not in proc.stderr
    assert "ResourceWarning" not in proc.stderr and not out.exists()


def test_every_format_trains_end_to_end(all_formats, demo_dir, tmp_path):
    out = tmp_path / "run"
    spec = ",".join(str(p) for p in all_formats)
    proc = run_train(["--model", str(demo_dir / "model"), "--train_data", spec, "--deepspeed",
                      str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out), "--max_steps", "6",
                      "--micro_batch_size", "4", "--lr", "2e-3", "--warmup_ratio", "0", "--num_workers", "1",
                      "--export_hf", "false", "--bad_records", "skip"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 48 demo records + 7 x 8 + one text-only OpenAI record + 2 good peer records; the 2 bad ones named
    assert "records: ok 107, unsupported_media 1, bad_record 1" in proc.stderr
    mixed = all_formats[-1]
    assert f"{mixed} record 1: unsupported_media: turn 0 (user): an <audio> placeholder" in proc.stderr
    assert f"{mixed} record 3: bad_record: image 'http://example.com/a.png' is a URL" in proc.stderr
    rows = read_metrics(out)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]


def test_validate_finds_and_names_every_planted_defect(demo_dir, tmp_path):
    path = write_bad_set(tmp_path, demo_dir)
    good = json.loads(path.read_text().splitlines()[0])
    with open(path, "a") as f:
        f.write(json.dumps({**good, "conversations": [good["conversations"][0],
                                                      {"from": "gpt", "value": "A red circle. " * 30}]}) + "\n")
    cmd = [sys.executable, "-m", "ds_vlm.data.validate", "--model", str(demo_dir / "model"), "--train_data", str(path),
           "--max_length", "64", "--workers", "1", "--micro_batch_size", "2", "--world_size", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout
    assert "records: ok 2, missing_image 1, unreadable_image 1, placeholder_mismatch 1, no_assistant_turn 1, " \
           "too_long 1" in out
    for index, kind in ((1, "missing_image"), (2, "unreadable_image"), (3, "placeholder_mismatch"),
                        (4, "no_assistant_turn"), (6, "too_long")):
        assert f"{path} record {index}: {kind}" in out
    assert "steps per epoch: 1 (2 usable samples, global batch 4 = 2 x 1 x 2)" in out
    assert "token length" in out and "image tokens per sample" in out
    assert "ignored key `id` in 1 record " in out
    proc = subprocess.run(cmd + ["--max_bad", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout
