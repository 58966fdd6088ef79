"""Mixed video/image/text batches on 2 ranks under ZeRO-3."""

from __future__ import annotations

import json

import pytest
from fixtures.datasets import absolute_rows, write_json, write_jsonl
from fixtures.encoding import check, video_encoder
from fixtures.runs import ROOT, crashed_copy, read_metrics, run_train

from ds_vlm.data.sources import RecordIndex
from ds_vlm.data.videos import VideoSampling

# Qwen3-VL (the demo's model, padded rows) and LLaVA-OneVision (every video --video_max_frames frames, pooled; packed)
RUNS = {"qwen3_vl": [], "llava_onevision": ["--packing"]}


@pytest.mark.parametrize("family", RUNS)
def test_two_ranks_zero3_mixed_video_trains_counts_as_preflight_and_resumes_exactly(family, family_models, demo_dir,
                                                                                    clips, tmp_path):
    """2 ranks, ZeRO-3 (every parameter partitioned), micro-batch 1, accumulation 2, on 8 video, image and text
    records (a micro-batch without video gets the dummy video, so no rank skips the video path): one epoch of 2
    steps trains;
    the steps' token and target counts sum to preflight's; a run resumed from the step-1 checkpoint logs the
    uninterrupted run's step-2 loss."""
    video = absolute_rows(clips / "video_train.jsonl", clips)
    image = absolute_rows(demo_dir / "data" / "train.jsonl", demo_dir / "data")
    text = [{"conversations": [{"from": "human", "value": "Say a caption."}, r["conversations"][1]]}
            for r in image[2:4]]
    data = write_jsonl(tmp_path / "mixed.jsonl", [video[0], text[0], image[0], video[1], text[1], video[2], image[1],
                                             video[3]])
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds = write_json(tmp_path / "zero3_all.json", ds)
    out = tmp_path / "run"
    model = family_models(family)
    args = ["--model", str(model), "--train_data", str(data), "--deepspeed", str(ds), "--max_steps", "2",
            "--micro_batch_size", "1", "--grad_accum", "2", "--lr", "1e-3", "--save_steps", "1", "--num_workers", "0",
            "--train_vision", "last:1", "--export_hf", "false", "--dist_timeout_s", "120", "--video_max_frames", "4",
            *RUNS[family]]
    proc = run_train(args + ["--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]

    checks = check(RecordIndex([str(data)]), video_encoder(model, family, VideoSampling(2.0, 4)))
    assert all(c.kind == "ok" for c in checks) and sum(c.n_video_tokens > 0 for c in checks) == 4
    assert sum(m["tokens"] for m in metrics) == sum(c.n_tokens for c in checks)
    assert sum(m["targets"] for m in metrics) == sum(c.n_targets for c in checks)

    resumed = crashed_copy(out, tmp_path / "resumed", 1)
    proc = run_train(args + ["--output_dir", str(resumed)])
    assert proc.returncode == 0 and "at step 1" in proc.stderr, proc.stderr[-5000:]
    again = read_metrics(resumed)
    assert [m["step"] for m in again] == [2]
    assert again[0]["loss"] == pytest.approx(metrics[1]["loss"], rel=1e-5, abs=1e-6)
