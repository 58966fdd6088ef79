"""Model FLOPs and the memory peaks a step reports."""

from __future__ import annotations

import types

import torch
from fixtures.models import load_4bit


def test_flops_counter_follows_the_config(demo_dir):
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import ModelConfig
    from ds_vlm.models import adapter_for
    from ds_vlm.runtime.flops import FlopsCounter

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
        + 3 * 2 * counter.n_projector * 16  # the mergers run over merged 2 x 2 squares: 16 rows
    # attention within each sample only: one row of two samples of 10 counts as two rows of 10, not 20^2
    assert counter({"input_ids": torch.zeros(1, 20, dtype=torch.long)}, 3, [10, 10]) == expected



TEXT_ONLY = {"input_ids": torch.zeros(2, 10, dtype=torch.long)}
TEXT_ATTENTION = 4 * 2 * 64 * 2 * 10 * 10  # 2 layers, width 4 heads x 16, two samples of 10 tokens
IMAGE = {**TEXT_ONLY, "image_grid_thw": torch.tensor([[1, 8, 8]])}  # 64 patches


def _language_weights(model) -> int:
    """The language tower's matmul weights, counted by hand: its layers and final norm, no embedding, no head."""
    text = model.model.language_model
    return sum(p.numel() for p in text.layers.parameters()) + sum(p.numel() for p in text.norm.parameters())


def test_flops_of_qlora_count_4bit_weights_whole_and_lora_apart(demo_dir):
    """QLoRA on the tiny Qwen3-VL (real bitsandbytes 4-bit weights, on the CPU): the language tower's weights by
    their real number (a 4-bit parameter's numel() is half: two a byte), frozen ones gradients pass through x2,
    LoRA's A and B x3 apart, the head x2, attention x3; the trained projector x3, the frozen vision tower x1."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import ModelConfig
    from ds_vlm.models import adapter_for
    from ds_vlm.models.loading import set_trainable
    from ds_vlm.models.lora import DEFAULT_TARGETS, apply_lora, is_quantized
    from ds_vlm.runtime.flops import FlopsCounter

    adapter, rank = adapter_for("qwen3_vl"), 4
    plain = AutoModelForImageTextToText.from_pretrained(demo_dir / "model")
    config = ModelConfig(path=str(demo_dir / "model"), lora_rank=rank, lora_bits=4)
    model = load_4bit(demo_dir / "model", config)
    set_trainable(model, adapter, config)
    apply_lora(model, adapter, config)
    assert sum(isinstance(m, Linear4bit) and is_quantized(m) for m in model.modules()) == 14  # 2 layers x 7
    counter = FlopsCounter(model, adapter, config)
    n_llm = _language_weights(plain)
    lora = sum(rank * (m.in_features + m.out_features) for n, m in plain.model.language_model.named_modules()
               if n.rsplit(".", 1)[-1] in DEFAULT_TARGETS)
    n_head, n_vision = plain.lm_head.weight.numel(), sum(p.numel() for p in plain.model.visual.blocks.parameters()) \
        + sum(p.numel() for p in plain.model.visual.patch_embed.parameters())  # pos_embed: a lookup
    n_projector = sum(p.numel() for p in (*plain.model.visual.merger.parameters(),
                                          *plain.model.visual.deepstack_merger_list.parameters()))
    assert (counter.n_llm, counter.n_llm_lora, counter.n_head, counter.n_vision, counter.n_projector) == \
        (n_llm, lora, n_head, n_vision, n_projector)
    text = 2 * 2 * n_llm * 20 + 3 * 2 * lora * 20 + 3 * TEXT_ATTENTION + 2 * 2 * n_head * 3
    assert counter(TEXT_ONLY, 3, [10, 10]) == text
    assert counter(IMAGE, 3, [10, 10]) == text + 2 * n_vision * 64 + 2 * 4 * 64 * 64 * 64 + 3 * 2 * n_projector * 16


def test_flops_of_the_last_vision_blocks_trained(demo_dir):
    """--train_vision last:1 of 2 blocks, nothing else trained: the last block x3 (its attention too), the first
    block and the patch embedding forward only (the gradient stops at the first trained block), the frozen
    projector, language tower and head x2 (the gradient passes through them to the vision block)."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import ModelConfig
    from ds_vlm.models import adapter_for
    from ds_vlm.runtime.flops import FlopsCounter

    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model")
    visual = model.model.visual
    counter = FlopsCounter(model, adapter_for("qwen3_vl"),
                           ModelConfig(train_vision="last:1", train_projector=False, train_llm=False))
    first, last = (sum(p.numel() for p in b.parameters()) for b in visual.blocks)
    embed = sum(p.numel() for p in visual.patch_embed.parameters())
    attention = 4 * 64 * 64 * 64  # one block: width 64, one image of 64 patches
    text = 2 * (2 * _language_weights(model) * 20 + 2 * model.lm_head.weight.numel() * 3) + 3 * TEXT_ATTENTION
    vision = 2 * (embed + first) * 64 + attention + 3 * (2 * last * 64 + attention)
    assert counter(IMAGE, 3, [10, 10]) == text + vision + 2 * 2 * counter.n_projector * 16


def test_qwen2_5_vl_windows_count_as_windows(family_models):
    """Qwen2.5-VL's windowed blocks attend within windows, its fullatt_block_indexes over the whole frame: the
    pairs per block equal the windows transformers builds (get_vision_window_index), and a hand count. The tiny
    model: windows of 112 px = 4 x 4 merged patches of 2 x 2 patches, block 1 full."""
    from transformers import AutoConfig
    from transformers.vision_utils import get_vision_window_index

    from ds_vlm.models import adapter_for

    config = AutoConfig.from_pretrained(family_models("qwen2_5_vl"))
    vision = config.vision_config
    grid = torch.tensor([[1, 12, 20], [2, 8, 8]])  # 6 x 10 merged: windows of rows 4 + 2 and columns 4 + 4 + 2
    pairs = adapter_for("qwen2_5_vl").vision_attention_pairs({"image_grid_thw": grid}, config)
    _, cu = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size, vision.patch_size)
    windows = torch.tensor(cu).diff() if not torch.is_tensor(cu) else cu.diff()
    by_hand = (4 * 4 + 2 * 2) * (4 * 4 + 4 * 4 + 2 * 2) * 2 ** 4 + 2 * (4 * 4 * 4) ** 2
    assert pairs == [by_hand, 240 ** 2 + 2 * 64 ** 2] and int((windows ** 2).sum()) == by_hand

def test_each_logged_step_has_its_own_memory_peak():
    """On CPU the peak RSS (VmHWM) is reset at each logged step; a big allocation raises it, the next reset
    brings it back down."""
    from ds_vlm.runtime.memory import peak_memory_gb, reset_peak_memory

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
    from ds_vlm.runtime.memory import TensorMeter, reachable_tensor_bytes

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

    from ds_vlm.runtime.flops import DELTA_RULE_CHUNK, token_mixing
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
    from ds_vlm.models import adapter_for
    from ds_vlm.models.base import ModelParts
    from ds_vlm.runtime.flops import FlopsCounter
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
