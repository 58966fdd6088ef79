"""Model FLOPs and the memory peaks a step reports."""

from __future__ import annotations

import torch


def test_flops_counter_follows_the_config(demo_dir):
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import ModelConfig
    from ds_vlm.metrics import FlopsCounter
    from ds_vlm.models import adapter_for

    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model")
    counter = FlopsCounter(model, adapter_for("qwen3_vl"), ModelConfig(train_vision="all"))
    layers = model.model.language_model.layers
    assert counter.n_llm == sum(p.numel() for p in layers.parameters()) + sum(
        p.numel() for p in model.model.language_model.norm.parameters())  # no embedding, no head
    assert counter.n_head == model.lm_head.weight.numel()
    text_only = {"input_ids": torch.zeros(2, 10, dtype=torch.long)}
    # the head only on the 3 label rows; 2 layers, attention width 4 heads x 16
    expected = 3 * (2 * counter.n_llm * 20 + 2 * counter.n_head * 3 + 4 * 2 * 64 * 2 * 10 * 10)
    assert counter(text_only, 3, [10, 10]) == expected
    with_image = {**text_only, "image_grid_thw": torch.tensor([[1, 8, 8]])}
    assert counter(with_image, 3, [10, 10]) - expected == 3 * (2 * counter.n_vision * 64 + 4 * 2 * 64 * 64 * 64) \
        + 3 * 2 * counter.n_projector * 64
    # attention within each sample only: one row of two samples of 10 counts as two rows of 10, not 20^2
    assert counter({"input_ids": torch.zeros(1, 20, dtype=torch.long)}, 3, [10, 10]) == expected


def test_each_logged_step_has_its_own_memory_peak():
    """On CPU the peak RSS (VmHWM) is reset at each logged step; a big allocation raises it, the next reset
    brings it back down."""
    from ds_vlm.memory import peak_memory_gb, reset_peak_memory

    reset_peak_memory()
    before, _ = peak_memory_gb()
    block = torch.ones(200 * 2 ** 20, dtype=torch.uint8)  # 200 MB touched
    during, _ = peak_memory_gb()
    del block
    reset_peak_memory()
    after, _ = peak_memory_gb()
    assert during > before + 0.15 and after < during - 0.15


def test_the_tensor_meter_sees_every_allocation_between_start_and_stop():
    """--measure_memory's meter: the bytes alive at the start (found by walking the interpreter's objects) plus
    the allocator's events in between; a 4 MB temporary freed before the end still makes the peak, and the
    running sum ends where a fresh walk does."""
    from ds_vlm.memory import TensorMeter, reachable_tensor_bytes

    kept = torch.ones(1_000_000)  # 4 MB alive throughout
    view = kept[10:]  # a view: the same storage, counted once
    before = reachable_tensor_bytes()
    assert before >= kept.numel() * 4
    meter = TensorMeter()
    meter.start()
    temporary = torch.ones(1_000_000) * 2  # 4 MB (the ones) freed at once, 4 MB kept until `del`
    made = torch.empty(500_000)  # 2 MB alive at the end
    del temporary
    peak = meter.stop()
    assert meter.baseline == before
    assert 8_000_000 <= peak - before <= 8_000_000 + 2_000_000 + 4096, peak - before
    assert meter.closing_gap == 0, meter.closing_gap
    assert reachable_tensor_bytes() - before == made.numel() * 4 and view.numel()
