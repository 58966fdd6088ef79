"""Expert parallelism (DeepSpeed AutoEP) on 2 CPU ranks: the tiny Qwen3-VL-MoE trained with its experts split
over the 2 ranks gives the losses of the run that keeps them whole (EP 1), images included; its step-2
checkpoint resumes at EP 2 with the uninterrupted losses, and is refused at EP 1."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures.runs import ROOT, read_metrics, run_train


def _run(model, out, ep: int, data):
    return run_train(["--model", str(model), "--train_data", str(data),
                      "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out),
                      "--max_steps", "4", "--save_steps", "2", "--micro_batch_size", "1", "--lr", "1e-3",
                      "--warmup_ratio", "0", "--num_workers", "0", "--dist_timeout_s", "120",
                      "--expert_parallel", str(ep), "--export_hf", "false"])


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


def test_expert_parallel_2_equals_1_and_resumes(family_models, tmp_path):
    model = tmp_path / "model"  # the tiny model without the router's aux loss (EP refuses it: unit/test_models.py)
    shutil.copytree(family_models("qwen3_vl_moe"), model)
    data = family_models("qwen3_vl_moe").parent / "data" / "train.jsonl"
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["output_router_logits"] = False
    (model / "config.json").write_text(json.dumps(config))
    losses = {}
    for ep in (1, 2):
        _ok(_run(model, tmp_path / f"ep{ep}", ep, data))
        losses[ep] = {r["step"]: r["loss"] for r in read_metrics(tmp_path / f"ep{ep}")}
    section = json.loads((tmp_path / "ep2" / "run_config.json").read_text())["ds_config"]["expert_parallel"]
    assert section["autoep_size"] == 2 and section["preset_model"] == "qwen3_moe" and section["top_k"] == 2
    assert sorted(losses[2]) == [1, 2, 3, 4] and losses[2] == pytest.approx(losses[1], abs=1e-5), losses

    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ep2" / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    (out / "checkpoints" / "latest").write_text("step_00000002")
    refused = _run(model, out, 1, data)
    assert refused.returncode != 0 and "expert_parallel: checkpoint 2, now 1" in refused.stderr, refused.stderr[-3000:]
    _ok(_run(model, out, 2, data))
    got = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert sorted(got) == [3, 4] and all(got[s] == pytest.approx(losses[2][s], rel=1e-5) for s in got), got
