"""Model FLOPs and the memory peaks a step reports."""

from __future__ import annotations

import types

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


def test_linear_attention_layers_count_what_the_delta_rule_computes():
    """A Gated DeltaNet layer's delta rule per token and value head: 6 d_k d_v + C (5 d_k + 3 d_v) (C = 64). Its
    matmuls are what torch's FLOP counter counts in transformers' torch path; the two triangular solves (which
    torch does not count) add C (d_k + d_v)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from ds_vlm.metrics import DELTA_RULE_CHUNK, token_mixing
    from ds_vlm.testing.hybrid import tiny_hybrid_text_config

    config = tiny_hybrid_text_config(linear_value_head_dim=32)
    full, per_token = token_mixing(config)
    per_head = 6 * 16 * 32 + 64 * (5 * 16 + 3 * 32)  # 3072 + 11264
    assert (full, per_token) == (1, 2 * 4 * per_head)
    length, heads = 256, 4
    q, k = torch.randn(1, length, 2, 16), torch.randn(1, length, 2, 16)
    v, g, beta = torch.randn(1, length, heads, 32), -torch.rand(1, length, heads), torch.rand(1, length, heads)
    with FlopCounterMode(display=False) as counted:
        torch_chunk_gated_delta_rule.__wrapped__(q, k, v, g, beta)
    solves = DELTA_RULE_CHUNK * (16 + 32)
    assert counted.get_total_flops() == length * heads * (per_head - solves)
    assert token_mixing(types.SimpleNamespace(num_hidden_layers=5, layer_types=None)) == (5, 0)


def test_flops_counter_on_a_hybrid_tower():
    """Qwen3.5's language tower: L^2 attention for its full-attention layer only, the delta rule for its two
    Gated DeltaNet layers per token (their projections and conv are weights, in n_llm): a packed row of two
    samples counts as the two alone."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from ds_vlm.config import ModelConfig
    from ds_vlm.metrics import FlopsCounter
    from ds_vlm.models import adapter_for
    from ds_vlm.models.base import ModelParts
    from ds_vlm.testing.hybrid import tiny_hybrid_text_config

    class Qwen35Parts(type(adapter_for("qwen3_vl"))):  # the towers only: the family's adapter is not on this branch
        def parts(self, model):
            visual, language = model.model.visual, model.model.language_model
            return ModelParts(vision=[visual.patch_embed, visual.pos_embed, visual.blocks], vision_blocks=visual.blocks,
                              projector=[visual.merger], llm=[language, model.lm_head], llm_decoder=language)

    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64}
    text = tiny_hybrid_text_config(linear_value_head_dim=32).to_dict()
    model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision))
    counter = FlopsCounter(model, Qwen35Parts(), ModelConfig())
    language = model.model.language_model
    assert counter.n_llm == sum(p.numel() for p in language.parameters()) - language.embed_tokens.weight.numel()
    delta_rule = 2 * 4 * (6 * 16 * 32 + 64 * (5 * 16 + 3 * 32))
    expected = 3 * (2 * counter.n_llm * 30 + 2 * counter.n_head * 3 + 4 * 1 * 64 * (10 * 10 + 20 * 20)
                    + delta_rule * 30)
    assert counter({"input_ids": torch.zeros(1, 30, dtype=torch.long)}, 3, [10, 20]) == expected
