"""LoRA's targets, QLoRA's refusals, QLoRA's flags and merge on a stand-in 4-bit layer."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ds_vlm.config import ConfigError, ModelConfig, TrainConfig
from ds_vlm.demo import FAMILIES
from ds_vlm.models import adapter_for
from ds_vlm.models.loading import quantization_config


def test_lora_goes_where_the_parts_train(demo_dir):
    """In process: LoRA on the language tower's projections (default) or every linear layer of a trained part
    (all-linear); a trained part without a target (the projector) trains fully and is a `modules_to_save` of the
    adapter; the embeddings and the LM head of a LoRA'd tower stay frozen."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.models.loading import set_trainable
    from ds_vlm.models.lora import apply_lora

    adapter = adapter_for("qwen3_vl")
    for targets, train_vision, lora_in_vision, saved in (
            ("default", "none", False, ["model.visual.merger", "model.visual.deepstack_merger_list.0"]),
            ("all-linear", "all", True, [])):
        model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model")
        config = ModelConfig(path="m", lora_rank=4, lora_targets=targets, train_vision=train_vision,
                             train_projector=targets == "default")
        set_trainable(model, adapter, config)
        peft_model, lora = apply_lora(model, adapter, config)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert all(".lora_" in n or any(n.startswith(m + ".") for m in saved) for n in trainable), trainable
        assert any(".visual.blocks." in n and ".lora_" in n for n in trainable) == lora_in_vision
        assert list(lora.modules_to_save or []) == saved
        assert not model.get_output_embeddings().weight.requires_grad
        assert not model.get_input_embeddings().weight.requires_grad
    with pytest.raises(ConfigError, match="--lora_targets 'nothing_like_this' matches no linear layer"):
        model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model")
        config = ModelConfig(path="m", lora_rank=4, lora_targets="nothing_like_this")
        set_trainable(model, adapter, config)
        apply_lora(model, adapter, config)


def test_qlora_is_refused_where_it_cannot_run(monkeypatch):
    config = ModelConfig(path="m", lora_rank=8, lora_bits=4)
    with pytest.raises(ConfigError, match="does not work with ZeRO-3"):
        quantization_config(config, adapter_for("qwen3_vl"), torch.bfloat16, True, None)
    with pytest.raises(ConfigError, match="needs --lora_rank > 0"):
        TrainConfig.from_keys(model="m", train_data="d", lora_bits=4).validate(for_training=False)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    with pytest.raises(ConfigError, match="--lora_bits 4 needs the bitsandbytes package"):
        quantization_config(config, adapter_for("qwen3_vl"), torch.bfloat16, False, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_quantizes_the_language_tower_only(family, family_models):
    """The names QLoRA gives transformers, through transformers' own conversion (`replace_with_bnb_linear`, whose
    matcher takes a name from its start or as a suffix): every module of the vision tower, the projector and the
    LM head stays as it is; every linear layer of the language tower becomes a 4-bit one."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    config = AutoConfig.from_pretrained(family_models(family))
    adapter = adapter_for(config.model_type)
    quantization = quantization_config(ModelConfig(path="m", lora_rank=4, lora_bits=4), adapter, torch.float32,
                                       False, config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    parts = adapter.parts(model)
    head = model.get_output_embeddings()
    before = {id(m): (name, type(m)) for name, m in model.named_modules()}
    kept = [before[id(m)] for root in (*parts.vision, *parts.projector, head) for m in root.modules()]
    language = [before[id(m)][0] for root in parts.llm for m in root.modules()
                if type(m) is torch.nn.Linear and m is not head]
    skipped = Bnb4BitHfQuantizer.get_modules_to_not_convert(model, quantization.llm_int8_skip_modules,
                                                           model._keep_in_fp32_modules)
    replace_with_bnb_linear(model, modules_to_not_convert=skipped, quantization_config=quantization)
    after = dict(model.named_modules())
    assert [name for name, kind in kept if type(after[name]) is not kind] == []
    assert sum(kind is torch.nn.Linear for _, kind in kept) >= 3  # a vision block's, the projector's, the head
    assert language and [name for name in language if not isinstance(after[name], Linear4bit)] == []


class _Fake4bit(torch.nn.Parameter):
    """A stand-in for bitsandbytes' Params4bit: integer storage and a quant_state (here: the scale)."""

    def __new__(cls, full: torch.Tensor):
        scale = full.abs().max() / 7
        param = super().__new__(cls, (full / scale).round().to(torch.int8) + 8, requires_grad=False)
        param.quant_state = types.SimpleNamespace(scale=scale, dtype=torch.float32, shape=full.shape)
        return param


def _fake_bitsandbytes(monkeypatch):
    functional = types.ModuleType("bitsandbytes.functional")
    functional.dequantize_4bit = lambda data, state: (data.float() - 8) * state.scale
    package = types.ModuleType("bitsandbytes")
    package.functional = functional
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)


def test_qlora_flags_and_merge_on_a_stand_in_4bit_layer(demo_dir, monkeypatch):
    """QLoRA's two crashes, on a stand-in 4-bit layer (integer weight + quant_state, as bitsandbytes keeps them):
    set_trainable leaves integer weights frozen inside a trained part (requires_grad_ on one raises), LoRA
    still targets the quantized layer, and the merged export dequantizes it first (W + B A x alpha / r, in
    full precision) and keeps no quantization entries or config."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.checkpoint.hf import plain_model
    from ds_vlm.config import ModelConfig
    from ds_vlm.models import adapter_for
    from ds_vlm.models.loading import set_trainable
    from ds_vlm.models.lora import apply_lora, dequantized_state_dict, is_quantized, merged_state_dict

    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model", dtype=torch.float32)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    full = layer.weight.detach().clone()
    layer.weight = _Fake4bit(full)
    with pytest.raises(RuntimeError, match="floating point"):
        layer.weight.requires_grad_(True)  # what set_trainable did before
    adapter = adapter_for("qwen3_vl")
    config = ModelConfig(path=str(demo_dir / "model"), lora_rank=4, lora_alpha=8, lora_bits=4)
    set_trainable(model, adapter, config)
    assert is_quantized(layer) and not layer.weight.requires_grad
    assert model.model.language_model.layers[0].self_attn.k_proj.weight.requires_grad
    peft_model, peft_config = apply_lora(model, adapter, config)
    assert "model.language_model.layers.0.self_attn.q_proj" in peft_config.target_modules
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    _fake_bitsandbytes(monkeypatch)
    base = peft_model.get_base_model().model.language_model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="dequantize the state dict before merging"):
        merged_state_dict(state, peft_config)
    merged = merged_state_dict(dequantized_state_dict(peft_model, state), peft_config)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    dequantized = (base.base_layer.weight.float() - 8) * base.base_layer.weight.quant_state.scale
    expected = dequantized + base.lora_B["default"].weight @ base.lora_A["default"].weight * (8 / 4)
    torch.testing.assert_close(merged[key], expected)
    torch.testing.assert_close(dequantized, full, atol=float(full.abs().max()) / 7, rtol=0)  # 4-bit rounding
    assert all(v.is_floating_point() for v in merged.values())
    model.config.quantization_config = {"load_in_4bit": True}
    plain = plain_model(model.config, merged)
    assert not hasattr(plain.config, "quantization_config") and hasattr(model.config, "quantization_config")
