"""The benchmark's parts that need no training: the padding comparison, the Qwen3-VL-2B preset's architecture."""

from __future__ import annotations

import pytest

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
    """What the published model is, checked against what the preset builds rather than against its own
    numbers: ~2.13 B parameters counted on the meta device (the model card's size), the rope sections cover
    the head, the processor's patching is the vision tower's, the special tokens are the tokenizer's."""
    config, tokenizer, processor = presets.preset_config("qwen3-vl-2b")
    text, vision = config.text_config, config.vision_config
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert text.hidden_size == text.num_attention_heads * text.head_dim == vision.out_hidden_size
    assert config.tie_word_embeddings
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert processor.image_processor.patch_size == vision.patch_size
    assert processor.image_processor.merge_size == vision.spatial_merge_size
    assert all(i < vision.depth for i in vision.deepstack_visual_indexes)

    n_params, n_trained = presets.count_parameters(config)
    assert 2.05e9 < n_params < 2.2e9, n_params
    assert 1.7e9 < n_trained < n_params  # vision tower frozen by default

    # on this kind of machine a 2-rank fp32 run of it does not fit: the benchmark refuses it with numbers
    assert runner.memory_estimate_gb(n_params, n_trained, "ds_zero3", 2, gpu=False) * 2 > 30
    assert runner.memory_estimate_gb(n_params, n_trained, "ds_zero2", 1, gpu=True) < 100  # one H100/H200: fits
