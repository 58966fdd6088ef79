"""Ulysses sequence parallelism on CPU ranks equals data parallelism."""

from __future__ import annotations

import json

import pytest
from fixtures.runs import ROOT, read_metrics, run_train


def _varied(demo_dir, mixed_data, tmp_path):
    """The mixed image/text records, answers of 1 to 3 sentences."""
    rows = [json.loads(line) for line in mixed_data.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["images"] = [str(demo_dir / "data" / p) for p in row["images"]]
        row["conversations"][1]["value"] = " ".join([row["conversations"][1]["value"]] * (1 + i % 3))
    path = tmp_path / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(demo_dir, data, out, ranks: int, *extra: str, stage: int = 2):
    proc = run_train(["--model", str(demo_dir / "model"), "--train_data", str(data), "--deepspeed",
                      str(ROOT / "ds_configs" / f"zero{stage}.json"), "--output_dir", str(out), "--max_steps", "3",
                      "--micro_batch_size", "2", "--lr", "1e-3", "--warmup_ratio", "0", "--train_vision", "all",
                      "--num_workers", "0", "--export_hf", "false", "--dist_timeout_s", "120", *extra],
                     nprocs=ranks)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return read_metrics(out), proc


def _same(rows, reference):
    assert [r["step"] for r in rows] == [1, 2, 3]
    for got, want in zip(rows, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), (rows, reference)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (rows, reference)
        assert got["tokens"] == want["tokens"] and got["targets"] == want["targets"]


def test_two_ranks_as_one_group_equal_one_rank(demo_dir, mixed_data, tmp_path):
    """1 rank without SP against 2 ranks with --sequence_parallel 2, the same global batch of 2 (one sample
    of each micro-batch is text-only about half the time; answers of different lengths so sequences are
    padded to split evenly): ZeRO-2 with --packing, ZeRO-3 without. A gradient off by the group size (what
    DeepSpeed's ZeRO-3 reduce-scatter gave with an SP mpu) changes the norm and the later losses."""
    data = _varied(demo_dir, mixed_data, tmp_path)
    reference, _ = _run(demo_dir, data, tmp_path / "one_rank", 1)
    for name, stage, extra in (("zero2_packed", 2, ("--packing",)), ("zero3", 3, ())):
        rows, proc = _run(demo_dir, data, tmp_path / name, 2, "--sequence_parallel", "2", *extra, stage=stage)
        assert "(1 groups of 2 sequence-parallel ranks)" in proc.stderr
        _same(rows, reference)


def test_four_ranks_as_two_groups_equal_two_ranks(demo_dir, mixed_data, tmp_path):
    data = _varied(demo_dir, mixed_data, tmp_path)
    reference, _ = _run(demo_dir, data, tmp_path / "two_ranks", 2, stage=3)
    rows, proc = _run(demo_dir, data, tmp_path / "two_groups", 4, "--sequence_parallel", "2", stage=3)
    assert "(2 groups of 2 sequence-parallel ranks)" in proc.stderr
    _same(rows, reference)
