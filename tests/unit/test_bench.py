"""The benchmark's parts that need no training: the padding comparison, the Qwen3-VL-2B preset's architecture."""

from __future__ import annotations

import sys

import pytest

from benchmarks import alternate, padding, presets, runner
from benchmarks import report as report_mod


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


def test_engine_pairs_take_turns_and_the_target_reads_every_round():
    """Each ZeRO stage's (ds-vlm, Trainer) pair runs as one alternating group; steps that spanned another
    case's window are left out of the median; the target is the median of the rounds' ratios with a floor."""
    cases = ["ds_zero2", "hf_zero2", "ds_zero3", "plain", "hf_zero3", "ds_zero0"]
    assert alternate.run_groups(cases, alternate=True) == [("ds_zero2", "hf_zero2"), ("ds_zero3", "hf_zero3"),
                                                        ("plain",), ("ds_zero0",)]  # hf_zero0 not asked for
    assert alternate.run_groups(cases, alternate=False) == [(c,) for c in cases]

    rows = [{"step": s, "step_time_s": t, "samples": 16, "tokens": 640, "computed": 700, "flops": None}
            for s, t in enumerate([9.0, 0.10, 0.12, 4.5, 0.11, 0.30, 0.10], start=1)]
    summary = runner.summarize("ds_zero2", rows, warmup=1, world=2, peak_tflops=None, interrupted_s=1.5)
    assert summary["steps_measured"] == 5 and summary["steps_interrupted"] == 1  # the 4.5 s step: a pause
    assert summary["s_per_step"] == 0.11
    assert runner.summarize("ds_zero2", rows, 1, 2, None)["steps_measured"] == 6  # sequential: kept

    def report(ours, theirs):
        return {"cases": {"ds_zero3": {"s_per_step": ours[0], "rounds_s_per_step": ours},
                          "hf_zero3": {"s_per_step": theirs[0], "rounds_s_per_step": theirs}}}
    met = report_mod.engine_target(report([0.10, 0.10, 0.10], [0.11, 0.10, 0.096]), 3)
    assert met["met"] and met["median_ratio"] == pytest.approx(1.0)
    assert met["spread"] == [pytest.approx(0.96), pytest.approx(1.1)]
    # median above 1.0 but one round below the floor; median below 1.0 with every round above the floor
    assert not report_mod.engine_target(report([0.10, 0.10, 0.10], [0.12, 0.11, 0.09]), 3)["met"]
    assert not report_mod.engine_target(report([0.10, 0.10, 0.10], [0.099, 0.098, 0.11]), 3)["met"]
    assert report_mod.engine_target(report([0.1], [0.1]), 2)["met"] is None  # ZeRO-2 not run


def test_alternating_runs_pause_and_resume_each_case(tmp_path):
    """Two real processes that log 40 steps, each step also as one line of a log they share. What is checked
    does not depend on how fast a loaded machine runs them: each goes past its first step only once resumed
    (it waits for SIGCONT there), so both are paused after their first step; the first window is the first
    case's; after that the shared log changes hands only at a window boundary (a case runs only while the
    other is stopped: two running at once would interleave step by step); both finish."""
    script = ("import json, signal, sys, time\n"
              "metrics, shared, case = sys.argv[1:]\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCONT})\n"
              "with open(metrics, 'a') as f, open(shared, 'a') as g:\n"
              "    for s in range(1, 41):\n"
              "        g.write(case + '\\n'); g.flush()\n"
              "        f.write(json.dumps({'step': s}) + '\\n'); f.flush()\n"
              "        if s == 1:\n"
              "            signal.sigwait({signal.SIGCONT})\n"
              "        time.sleep(0.02)\n")
    shared = tmp_path / "shared.log"
    cases = ("ds_zero2", "ds_zero3")
    runs = [(case, [sys.executable, "-c", script, str(tmp_path / case / "metrics.jsonl"), str(shared), case],
             tmp_path / case) for case in cases]
    results = alternate.run_alternating(runs, timeout=120, window_s=0.2)
    for case, _, out in runs:
        assert results[case]["status"] == "ok" and results[case]["windows"] >= 1, results[case]
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 40
    order = shared.read_text().split()
    assert sorted(order[:2]) == list(cases) and order[2] == cases[0], order  # both paused; then the first case
    switches = sum(a != b for a, b in zip(order, order[1:]))
    assert switches <= 1 + sum(results[c]["windows"] for c in cases), (switches, results)
