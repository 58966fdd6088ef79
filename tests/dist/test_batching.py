"""Packing on 2 ranks under ZeRO-3 trains as padding does: Qwen3-VL, and Qwen3.5 (whose Gated DeltaNet layers
carry a conv window and a recurrent state along the row: packed exactly only if both restart at each sample)."""

from __future__ import annotations

import json

import pytest
from fixtures.runs import ROOT, read_metrics, run_train


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5", "qwen3_5_moe"])
def test_two_ranks_zero3_packed_equals_padded(family, demo_dir, family_models, tmp_path):
    """2 ranks, ZeRO-3 (fp32 on the CPU), micro-batch 4, answers of 1 to 3 sentences, every third record
    text-only: the same step losses over 3 steps with --packing as without (rel 1e-6), and no padding
    computed."""
    rows = [json.loads(line) for line in (demo_dir / "data" / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["images"] = [str(demo_dir / "data" / row["images"][0])]
        row["conversations"][1]["value"] = " ".join([row["conversations"][1]["value"]] * (1 + i % 3))
        if i % 3 == 2:  # mixed: text-only records beside the image ones
            row["conversations"][0]["value"] = row["conversations"][0]["value"].replace("<image>", "")
            row["images"] = []
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses, rows = {}, {}
    for name, extra in (("padded", []), ("packed", ["--packing"])):
        out = tmp_path / name
        proc = run_train(["--model", str(family_models(family)), "--train_data", str(data),
                          "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--output_dir", str(out),
                          "--max_steps", "3", "--micro_batch_size", "4", "--lr", "1e-3", "--warmup_ratio", "0",
                          "--num_workers", "0", "--export_hf", "false", "--dist_timeout_s", "120", *extra])
        assert proc.returncode == 0, proc.stderr[-5000:]
        rows[name] = read_metrics(out)
        losses[name] = [r["loss"] for r in rows[name]]
    assert len(losses["packed"]) == 3
    # rel 1e-6, not 1e-4: on this tiny Qwen3.5 a conv window and delta-rule state leaking from one packed sample
    # into the next moves the step losses by 5e-5 (measured with the restart removed), which 1e-4 would pass
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-6)
    assert all(r["padding_efficiency"] >= 0.99 for r in rows["packed"])
    assert max(r["padding_efficiency"] for r in rows["padded"]) < 0.99  # the answers differ in length
