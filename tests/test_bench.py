"""The benchmark (ds_vlm/bench, launch/bench.py) without training: the padding comparison and the Qwen3-VL-2B
preset's architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from ds_vlm.bench import padding, presets, runner


def test_token_budget_batches_compute_25_percent_fewer_tokens(demo_dir, tmp_path):
    """Real token lengths (real processor and encoder) of varied-length records; the same samples, each
    once, in fixed micro-batches of 8 and in token-budget ones."""
    data = presets.build_shapes_data(tmp_path / "varied", 256, seed=42, side=64, varied=True)
    lengths = presets.token_lengths(demo_dir / "model", data, max_length=100_000)
    assert len(lengths) == 256 and max(lengths) > 3 * min(lengths)  # really varied: answers and images

    report = padding.padding_report(lengths, micro_batch_size=8, world_size=2)
    fixed, budget = report["fixed"], report["token_budget"]
    assert fixed["samples"] == budget["samples"] == 256
    assert fixed["real_tokens"] == budget["real_tokens"] == sum(lengths)
    assert report["max_tokens_per_batch"] >= max(lengths)
    assert budget["largest_micro_batch_tokens"] <= report["max_tokens_per_batch"]
    saved = 1 - budget["computed_tokens"] / fixed["computed_tokens"]
    assert report["computed_tokens_saved"] == pytest.approx(saved)
    assert saved >= padding.TOKEN_BUDGET_TARGET, report
    assert report["target_met"]

    # by hand, on three micro-batches: longest x count
    assert padding.plan_cost([[0, 1], [2], []], [3, 5, 4])["computed_tokens"] == 2 * 5 + 4


def test_qwen3_vl_2b_preset_is_the_real_architecture():
    """Config facts of Qwen/Qwen3-VL-2B-Instruct, ~2.13 B parameters counted on the meta device."""
    config, tokenizer, processor = presets.preset_config("qwen3-vl-2b")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (2048, 28, 16, 8, 128, 6144, 151936)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads, vision.patch_size,
            vision.spatial_merge_size, vision.out_hidden_size) == (24, 1024, 4096, 16, 16, 2, 2048)
    assert vision.deepstack_visual_indexes == [5, 11, 17]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert processor.image_processor.patch_size == vision.patch_size
    assert processor.image_processor.merge_size == vision.spatial_merge_size

    n_params, n_trained = presets.count_parameters(config)
    assert 2.05e9 < n_params < 2.2e9, n_params
    assert 1.7e9 < n_trained < n_params  # vision tower frozen by default

    # on this kind of machine a 2-rank fp32 run of it does not fit: the benchmark refuses it with numbers
    assert runner.memory_estimate_gb(n_params, n_trained, "ds_zero3", 2, gpu=False) * 2 > 30
    assert runner.memory_estimate_gb(n_params, n_trained, "ds_zero2", 1, gpu=True) < 100  # one H100/H200: fits


@pytest.mark.dist
def test_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    """`bash launch/gpu_check.sh --dry_run`: every stage that can run on a CPU runs (the real entry on ZeRO-2 and
    ZeRO-3, packed; exact resume; the export reloaded and generating; LoRA; the sweep's path on the tiny model)
    and passes; the CUDA-only ones are skipped with the reason; the JSON has one record per stage."""
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--dry_run", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads(out.read_text())["stages"]}
    assert list(stages) == ["train_zero2", "train_zero3", "save_resume", "export", "lora", "qlora", "liger",
                            "sweep_2b"]
    assert {n for n, s in stages.items() if s["status"] == "skipped"} == {"qlora", "liger"}
    assert all(s["status"] == "ok" for n, s in stages.items() if n not in ("qlora", "liger"))
    assert all("CUDA only" in stages[n]["detail"]["reason"] for n in ("qlora", "liger"))
    for name in ("train_zero2", "train_zero3"):
        detail = stages[name]["detail"]
        assert len(detail["losses"]) == 4 and detail["backend"] == "gloo"
        assert detail["attention"] == "varlen interface: per-sample sdpa on the CPU"
        assert detail["optimizer"] == "DeepSpeed FusedAdam"
    assert stages["save_resume"]["detail"]["max_rel_difference"] < 1e-5
    assert stages["export"]["detail"]["answer"]
    sweep = stages["sweep_2b"]["detail"]
    assert [r["status"] for r in sweep["rows"]] == ["ok", "ok"] and sweep["largest_tokens"] > 0
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in sweep["rows"])
