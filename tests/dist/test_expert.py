"""Expert parallelism (DeepSpeed AutoEP) on 2 CPU ranks: the tiny Qwen3-VL-MoE trained with its experts split
over the 2 ranks gives the losses of the run that keeps them whole (EP 1), images included."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, read_metrics, run_train


def test_expert_parallel_2_equals_1(family_models, tmp_path):
    model = family_models("qwen3_vl_moe")
    losses = {}
    for ep in (1, 2):
        out = tmp_path / f"ep{ep}"
        proc = run_train(["--model", str(model), "--train_data", str(model.parent / "data" / "train.jsonl"),
                          "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out),
                          "--max_steps", "3", "--micro_batch_size", "1", "--lr", "1e-3", "--warmup_ratio", "0",
                          "--num_workers", "0", "--dist_timeout_s", "120", "--expert_parallel", str(ep),
                          "--export_hf", "false"])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
        losses[ep] = [r["loss"] for r in read_metrics(out)]
    section = json.loads((tmp_path / "ep2" / "run_config.json").read_text())["ds_config"]["expert_parallel"]
    assert section["autoep_size"] == 2 and section["preset_model"] == "qwen3_moe" and section["top_k"] == 2
    assert len(losses[2]) == 3 and losses[2] == pytest.approx(losses[1], abs=1e-5), losses
