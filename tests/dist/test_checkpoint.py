"""Checkpoints: kill -9 and exact resume, atomic saves, failed saves, world-size change, offline export."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures.datasets import write_json
from fixtures.runs import ROOT, launch_and_kill_after, read_metrics, run_train, train_command, train_env

from ds_vlm.checkpoint.meta import MARKER, read_meta
from ds_vlm.checkpoint.resume import find_checkpoint, resume_point
from ds_vlm.config import ConfigError, TrainConfig

STEPS, SAVE = 6, 2


def _args(demo_dir: Path, out: Path, ds: Path, *extra: str) -> list[str]:
    return ["--model", str(demo_dir / "model"), "--train_data", str(demo_dir / "data" / "train.jsonl"),
            "--deepspeed", str(ds), "--output_dir", str(out), "--max_steps", str(STEPS), "--micro_batch_size", "2",
            "--lr", "1e-3", "--warmup_ratio", "0.2", "--save_steps", str(SAVE), "--num_workers", "0",
            "--train_vision", "last:1", "--dist_timeout_s", "120", *extra]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}  # a re-run step overwrites the killed run's line


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


def _zero3_all_partitioned(tmp: Path) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return write_json(tmp / "zero3_all.json", ds)


# The ZeRO-2 runs pack their micro-batches (--packing): exact resume holds for packed rows too.
PACKING = {"zero3": (), "zero2": ("--packing",)}


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory):
    """Uninterrupted ZeRO-3 and ZeRO-2 (packed) runs: per-step losses, checkpoints every 2 steps, HF export."""
    tmp = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, ds in (("zero3", _zero3_all_partitioned(tmp)), ("zero2", ROOT / "ds_configs" / "zero2.json")):
        out = tmp / name
        _ok(run_train(_args(demo_dir, out, ds, *PACKING[name], "--export_hf", "true" if name == "zero3" else "false")))
        runs[name] = (out, ds)
    return runs




@pytest.mark.parametrize("stage", ["zero3"])  # ZeRO-2 (packed): the preemption test below resumes it exactly
def test_kill_9_then_resume_reproduces_the_uninterrupted_losses(stage, reference, demo_dir, tmp_path):
    ref_out, ds = reference[stage]
    out = tmp_path / "run"
    launch_and_kill_after(_args(demo_dir, out, ds, *PACKING[stage], "--export_hf", "false"), step=3)
    killed_at = max(_losses(out))
    resumed_from = find_checkpoint(str(out))
    assert resumed_from is not None and read_meta(resumed_from).step in (2, 4)
    proc = run_train(_args(demo_dir, out, ds, *PACKING[stage], "--export_hf", "false"))
    _ok(proc)
    start = read_meta(resumed_from).step
    assert f"resumed from {resumed_from} at step {start}" in proc.stderr
    assert "48 records, 48 from the cache" in proc.stderr  # the restart did not encode the data again
    expected, got = _losses(ref_out), _losses(out)
    assert killed_at >= 3 and sorted(got) == list(range(1, STEPS + 1))
    for step in range(start + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)


def test_preemption_checkpoints_the_finished_step_and_resumes_exactly(reference, demo_dir, tmp_path):
    """SIGTERM to the launcher's whole process group mid-run (what SLURM and Kubernetes do): every rank finishes
    its step, a checkpoint of the last finished step is written, a `preempted` event logged, the ranks exit 75;
    the resumed run's later losses equal the uninterrupted run's."""
    ref_out, ds = reference["zero2"]
    out = tmp_path / "run"
    args = _args(demo_dir, out, ds, *PACKING["zero2"], "--export_hf", "false")
    proc = subprocess.Popen(train_command(args, launcher="deepspeed"), cwd=ROOT, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").exists() and read_metrics(out)) and time.time() < deadline:
        assert proc.poll() is None
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=180)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (preempted,) = [e for e in events if e.get("event") == "preempted"]
    stop = preempted["step"]
    assert preempted["checkpoint_saved"] and 1 <= stop < STEPS, text[-3000:]
    assert max(_losses(out)) == stop  # no finished step's work is lost: the checkpoint holds the last one
    assert find_checkpoint(str(out)).name == f"step_{stop:08d}"
    assert f"ds-vlm: preempted after step {stop}: checkpoint" in text and "resume (exit 75)" in text
    proc = run_train(args)
    _ok(proc)
    assert f"at step {stop}" in proc.stderr
    expected, got = _losses(ref_out), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(stop + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)


def _output_dir_holding(ref_out: Path, step: int, out: Path) -> Path:
    """A fresh output dir whose only (and latest) checkpoint is the reference run's at `step`."""
    tag = f"step_{step:08d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_out / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)
    return out


@pytest.mark.parametrize("stage, ranks", [("zero3", 1), ("zero3", 4), ("zero2", 1)])
def test_resume_on_another_world_size(stage, ranks, reference, demo_dir, tmp_path):
    """A 2-rank ZeRO-3 checkpoint (micro-batch 2) resumes on 1 rank (accumulation 2) and on 4 ranks
    (micro-batch 1) through the universal format: the same global batches, the same losses; a ZeRO-2 one
    (packed) on 1 rank."""
    ref_out, ds = reference[stage]
    out = _output_dir_holding(ref_out, 2, tmp_path / f"{ranks}_ranks")
    args = _args(demo_dir, out, ds, *PACKING[stage], "--export_hf", "false")
    if ranks == 1:
        args += ["--grad_accum", "2"]
    else:
        args[args.index("--micro_batch_size") + 1] = "1"
    proc = run_train(args, nprocs=ranks)
    _ok(proc)
    assert "(universal format)" in proc.stderr
    expected, got = _losses(ref_out), _losses(out)
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)


def test_offline_export_equals_the_engine_weights(reference, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    ref_out, _ = reference["zero3"]
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "ds_vlm.checkpoint.export", str(ref_out), str(out), "--dtype", "fp32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    _ok(proc)
    engine_weights = load_file(ref_out / "hf" / "model.safetensors")  # gathered from the live ZeRO-3 engine
    exported = load_file(out / "model.safetensors")
    assert engine_weights.keys() == exported.keys()
    for key in engine_weights:
        assert engine_weights[key].dtype == torch.float32
        assert torch.equal(engine_weights[key], exported[key]), key
    assert any(".visual.blocks.0." in k for k in exported)  # frozen vision blocks are exported too
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    AutoModelForImageTextToText.from_pretrained(out)


def test_partial_checkpoints_are_never_resumed(reference, tmp_path):
    ref_out, _ = reference["zero2"]
    root = tmp_path / "out" / "checkpoints"
    shutil.copytree(ref_out / "checkpoints", root)
    latest = find_checkpoint(str(tmp_path / "out"))
    assert latest.name == "step_00000006"
    # a save killed half-way: folder without its marker, latest not yet swapped
    shutil.copytree(root / "step_00000006", root / "step_00000008.partial")
    (root / "step_00000008.partial" / MARKER).unlink()
    assert find_checkpoint(str(tmp_path / "out")) == latest
    # a pointer to an incomplete folder falls back to the newest complete one
    (root / "latest").write_text("step_00000008")
    assert find_checkpoint(str(tmp_path / "out")) == latest


def test_failed_save_is_reported_and_keeps_earlier_checkpoints(reference, demo_dir, tmp_path):
    """Resume from step 4 with a 1 MB file-size limit: the step-6 save fails, step 4 stays intact."""
    ref_out, ds = reference["zero2"]
    out = _output_dir_holding(ref_out, 4, tmp_path / "run")
    limit = 1 << 20
    proc = run_train(_args(demo_dir, out, ds, *PACKING["zero2"], "--export_hf", "false"),
                     preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode != 0
    assert "checkpoint at step 6 FAILED" in proc.stderr and "could not be written" in proc.stderr
    assert find_checkpoint(str(out)).name == "step_00000004"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not list((out / "checkpoints").glob("*.partial"))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "checkpoint_failed" and e["step"] == 6 for e in events)
    _ok(run_train(_args(demo_dir, out, ds, *PACKING["zero2"], "--export_hf", "false")))  # still resumes from 4
    assert find_checkpoint(str(out)).name == "step_00000006"


def test_resume_with_a_changed_config_is_refused_with_the_difference(reference):
    ref_out, ds = reference["zero2"]
    saved = read_meta(find_checkpoint(str(ref_out))).run
    config = TrainConfig.from_keys(**{**saved.config, "lr": 5e-4, "micro_batch_size": 4})
    run_meta = dataclasses.replace(saved, config=config.to_keys(), global_batch=8)
    with pytest.raises(ConfigError) as err:
        resume_point(config.checkpoint, run_meta)
    assert "lr: checkpoint 0.001, now 0.0005" in str(err.value)
    assert "global batch: checkpoint 4 (micro 2 x accum 1 x 2 ranks), now 8" in str(err.value)
    assert "--resume_ignore_config" in str(err.value)
    config.checkpoint.resume_ignore_config = True
    assert resume_point(config.checkpoint, run_meta)[0] is not None
    config.checkpoint.resume = "none"
    assert resume_point(config.checkpoint, run_meta) == (None, False)


def test_non_finite_steps_are_skipped_then_the_run_stops(demo_dir, tmp_path):
    out = tmp_path / "diverge"
    proc = run_train(_args(demo_dir, out, ROOT / "ds_configs" / "zero2.json", "--lr", "1e30", "--warmup_ratio", "0",
                           "--max_steps", "12", "--max_bad_steps", "2", "--save_steps", "1", "--export_hf", "false"))
    assert proc.returncode != 0
    assert "2 optimizer steps in a row" in proc.stderr and "Last good checkpoint" in proc.stderr
    rows = read_metrics(out)
    assert rows[-1]["skipped"] and rows[-2]["skipped"] and rows[-1]["skipped_steps"] >= 2
    assert not rows[0]["skipped"]
