"""The loss does not depend on how the global batch is split over ranks and accumulation steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.runs import ROOT, read_metrics, run_train


def _normalisation_data(demo_dir: Path, tmp: Path) -> Path:
    """4 samples whose answers have very different lengths (1 to ~40 label tokens)."""
    base = json.loads((demo_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    image = str(demo_dir / "data" / base["images"][0])
    answers = ["A red circle.", "A blue square. " * 8, "Red.", "A green triangle. A yellow circle. " * 3]
    records = [{"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                                  {"from": "gpt", "value": a.strip()}], "images": [image]} for a in answers]
    path = tmp / "four.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_loss_and_gradients_do_not_depend_on_the_split(demo_dir, tmp_path):
    """One step on the same 4 samples: (1 rank, mb 4, accum 1), (1 rank, mb 1, accum 4), (2 ranks, mb 1,
    accum 2). With Adam's eps = 1 the first update is lr * g / (|g| + 1), one-to-one in g (unlike the usual
    eps, where it is sign(g)): the exported weights carry the gradient, so equal weights mean equal gradients."""
    from safetensors.torch import load_file

    data = _normalisation_data(demo_dir, tmp_path)
    results = {}
    for name, ranks, micro, accum in (("1x4x1", 1, 4, 1), ("1x1x4", 1, 1, 4), ("2x1x2", 2, 1, 2)):
        out = tmp_path / name
        proc = run_train(["--model", str(demo_dir / "model"), "--train_data", str(data), "--deepspeed",
                          str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out), "--max_steps", "1",
                          "--micro_batch_size", str(micro), "--grad_accum", str(accum), "--lr", "1.0",
                          "--adam_eps", "1", "--warmup_ratio", "0", "--grad_clip", "0", "--train_vision", "all",
                          "--num_workers", "0"], nprocs=ranks)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (row,) = read_metrics(out)
        results[name] = (row["loss"], row["grad_norm"], load_file(out / "hf" / "model.safetensors"))
    initial = load_file(demo_dir / "model" / "model.safetensors")
    ref_loss, ref_norm, ref_weights = results["1x4x1"]
    for name, (loss, norm, weights) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        assert norm == pytest.approx(ref_norm, rel=1e-4), name
        for key, value in ref_weights.items():
            delta, ref_delta = weights[key] - initial[key], value - initial[key]
            torch.testing.assert_close(delta, ref_delta, rtol=1e-4, atol=1e-7, msg=f"{name} {key}")
    moved = sum(int((ref_weights[k] != initial[k]).sum()) for k in ref_weights)
    assert moved > 100_000  # the update is not trivially zero
