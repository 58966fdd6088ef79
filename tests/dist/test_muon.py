"""DeepSpeed's Muon under ZeRO on 2 CPU ranks: ZeRO-2 and ZeRO-3 train alike, and a resumed run's losses are
the uninterrupted run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures.runs import ROOT, read_metrics, run_train

STEPS = 6


def _args(demo_dir: Path, out: Path, stage: int, *extra: str) -> list[str]:
    return ["--model", str(demo_dir / "model"), "--train_data", str(demo_dir / "data" / "train.jsonl"),
            "--deepspeed", str(ROOT / "ds_configs" / f"zero{stage}.json"), "--optimizer", "muon",
            "--output_dir", str(out), "--max_steps", str(STEPS), "--micro_batch_size", "2", "--lr", "1e-3",
            "--warmup_ratio", "0.2", "--save_steps", "2", "--num_workers", "0", "--train_vision", "last:1",
            "--dist_timeout_s", "120", "--export_hf", "false", *extra]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory) -> dict[int, Path]:
    runs = {}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp(f"muon_zero{stage}")
        proc = run_train(_args(demo_dir, out, stage))
        _ok(proc)
        assert "optimizer DeepSpeed Muon on 22 of 48 trained tensors" in proc.stderr
        runs[stage] = out
    return runs


def test_muon_trains_alike_under_zero_2_and_3(uninterrupted):
    """DeepSpeed splits our two groups into a Muon and an AdamW half each; both stages give the same losses (to
    fp32 rounding: ZeRO-3 orthogonalizes the gathered gradient, ZeRO-2 the reduced one) and they fall."""
    two, three = _losses(uninterrupted[2]), _losses(uninterrupted[3])
    assert sorted(two) == sorted(three) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(three[step], abs=2e-4), (step, two, three)
    assert two[STEPS] < two[1] - 0.3
    groups = json.loads((uninterrupted[3] / "run_config.json").read_text())["optimizer_groups"]
    names = sorted(g["name"] for g in groups)
    assert names == ["vision+projector+llm-adam-params", "vision+projector+llm-muon-params"], names
    by_name = {g["name"]: g["initial_lr"] for g in groups}
    assert by_name["vision+projector+llm-muon-params"] == 0.02 and by_name["vision+projector+llm-adam-params"] == 1e-3


def test_muon_resumes_exactly(uninterrupted, demo_dir, tmp_path):
    """ZeRO-2's step-2 checkpoint (Muon's momentum and AdamW's moments in it) resumed in a fresh output dir:
    steps 3-6 equal the uninterrupted run's."""
    ref = uninterrupted[2]
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    (out / "checkpoints" / "latest").write_text("step_00000002")
    proc = run_train(_args(demo_dir, out, 2))
    _ok(proc)
    expected, got = _losses(ref), _losses(out)
    assert sorted(got) == [3, 4, 5, 6], got
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)
