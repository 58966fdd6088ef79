"""The family adapters: Qwen's patch embedding as a linear layer, frozen towers keep no activations, MoE experts
without tokens, unsupported families named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.numerics import full_logits_loss_sum

from ds_vlm.config import ModelConfig
from ds_vlm.data.batching import Collator, SFTDataset
from ds_vlm.data.encode import Encoder
from ds_vlm.data.images import load_images
from ds_vlm.data.plan import BatchPlan
from ds_vlm.data.sources import RecordIndex
from ds_vlm.demo import FAMILIES
from ds_vlm.models import adapter_by_family, adapter_for
from ds_vlm.models.loading import enable_checkpointing, set_trainable
from ds_vlm.models.qwen import QwenVLAdapter


@pytest.mark.parametrize("family", [f for f in FAMILIES if isinstance(adapter_by_family(f), QwenVLAdapter)])
def test_patch_projection_equals_the_conv3d(family, family_models):
    """Qwen's patch embedding run as one linear layer over the flattened patch: the same output and the same
    gradients (input, weight, bias) as the Conv3d, in fp32; the parameters, their names and the state dict
    are untouched (checkpoints, exports and loaded weights do not change)."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.models import adapter_for
    from ds_vlm.patches.torch_modules import PatchProjection

    model = AutoModelForImageTextToText.from_pretrained(family_models(family), dtype=torch.float32)
    embed = model.model.visual.patch_embed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    patches = torch.randn(12, embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2,
                          requires_grad=True)

    def run():
        for p in embed.parameters():
            p.grad = None
        patches.grad = None
        out = embed(patches)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), patches.grad.clone(), [p.grad.clone() for p in embed.parameters()]

    conv = run()
    adapter_for(model.config.model_type).prepare(model)
    assert type(embed.proj) is PatchProjection and isinstance(embed.proj, torch.nn.Conv3d)
    linear = run()
    # the same sums in another order: fp32 rounding over a dot product of up to 1,176 terms reached 1.4e-6 (on
    # unseeded inputs, once in a loaded suite); a wrong weight layout is off by the values themselves
    for a, b in zip([linear[0], linear[1], *linear[2]], [conv[0], conv[1], *conv[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert float((a - b).abs().max()) < 1e-3 * float(b.abs().max())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


STEPS, MICRO, LR = 5, 2, 2e-3


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, family_models) -> Path:
    return family_models(request.param)


def _load(path: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), AutoProcessor.from_pretrained(path)


def _vision_block_activity(model, processor, family, config, record) -> list[tuple[bool, int]]:
    """Per vision block in one training forward: (output requires grad, tensors saved for backward)."""
    adapter = adapter_for(family)
    set_trainable(model, adapter, config)
    enable_checkpointing(model, adapter, config)
    encoder = Encoder(processor, adapter, 4096)
    sample = RecordIndex([str(record)]).sample(0)
    collate = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())
    batch = collate([encoder.encode(sample, load_images(sample))]).inputs
    current, saved, needs_grad, hooks = [None], {}, {}, []

    def enter(index):
        return lambda module, args: current.__setitem__(0, index)

    def leave(index):
        def hook(module, args, output):
            current[0] = None
            needs_grad[index] = (output[0] if isinstance(output, tuple) else output).requires_grad
        return hook

    for i, block in enumerate(adapter.parts(model).vision_blocks):
        hooks += [block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave(i))]

    def pack(tensor):
        if current[0] is not None:
            saved[current[0]] = saved.get(current[0], 0) + 1
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    for hook in hooks:
        hook.remove()
    return [(needs_grad[i], saved.get(i, 0)) for i in sorted(needs_grad)]


def test_frozen_vision_tower_keeps_no_activations(family_model, demo_dir):
    """transformers' enable_input_require_grads() would hook the patch embedding too (Qwen2-VL, Qwen2.5-VL,
    CLIP) and make a frozen tower build a graph; the trainer only hooks the token embeddings."""
    family = json.loads((family_model / "config.json").read_text())["model_type"]
    record = demo_dir / "data" / "test.jsonl"
    model, processor = _load(family_model)
    frozen = _vision_block_activity(model, processor, family, ModelConfig(), record)
    assert frozen and all(activity == (False, 0) for activity in frozen), frozen
    model, processor = _load(family_model)
    last = _vision_block_activity(model, processor, family,
                                  ModelConfig(train_vision="last:1"), record)
    assert all(a == (False, 0) for a in last[:-1]) and last[-1][0] and last[-1][1] > 0, last
    model, _ = _load(family_model)
    config = ModelConfig(vision_checkpointing=True)
    enable_checkpointing(model, adapter_for(family), config)
    assert all(block.gradient_checkpointing for block in adapter_for(family).parts(model).vision_blocks)


@pytest.mark.parametrize("family_model", ["qwen3_vl_moe", "qwen3_5_moe"], indirect=True)
def test_moe_experts_without_tokens_on_one_rank_and_router_aux_loss(family_model, mixed_data):
    """Step 1 of the MoE run above routes tokens to experts that get none on the other rank; the
    router's aux loss (when a config asks for it) leaves the logits, and so our loss, unchanged."""
    family = json.loads((family_model / "config.json").read_text())["model_type"]
    model, processor = _load(family_model)
    model.eval()
    adapter = adapter_for(family)
    encoder = Encoder(processor, adapter, 4096)
    dataset = SFTDataset(RecordIndex([str(mixed_data)]), encoder)
    collate = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())
    plan = BatchPlan(len(dataset), MICRO, 1, 2, seed=42)
    routers = [layer.mlp.gate for layer in model.model.language_model.layers]
    hit = []  # per rank, per layer: the experts that received a token
    for rank in range(2):
        micro = collate([dataset[i] for i in plan.micro_batches(0, rank)[0]])
        batch, labels = micro.inputs, micro.labels
        seen = []
        hooks = [r.register_forward_hook(lambda m, a, o: seen.append(set(o[2].flatten().tolist()))) for r in routers]
        with torch.no_grad():
            plain = model(**batch)
            with_aux = model(**batch, output_router_logits=True)
        for hook in hooks:
            hook.remove()
        hit.append(seen[:len(routers)])
        assert with_aux.aux_loss is not None and torch.isfinite(with_aux.aux_loss)
        assert torch.equal(plain.logits, with_aux.logits)
        assert torch.isfinite(full_logits_loss_sum(plain.logits, labels))
    experts = model.config.text_config.num_experts
    assert any(hit[0][layer] ^ hit[1][layer] for layer in range(len(routers)))  # tokens on one rank only
    assert any(len(hit[r][layer]) < experts for r in range(2) for layer in range(len(routers)))


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_parts_full_precision_names_lora_targets_and_hybrid_checkpointing(family, family_models):
    """Qwen3.5's hybrid tower (linear- and full-attention layers) and its vision tower without deepstack: every
    parameter in one part (QLoRA's full-precision names come from these parts: test_lora.py checks them against
    transformers' conversion for every family); LoRA's default targets reach every projection of both layer kinds;
    activation checkpointing covers both layer kinds."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.models.loading import part_parameters
    from ds_vlm.models.lora import target_modules

    model = AutoModelForImageTextToText.from_pretrained(family_models(family), dtype=torch.float32)
    adapter = adapter_for(family)
    kinds = model.config.text_config.layer_types
    assert {"linear_attention", "full_attention"} == set(kinds) and kinds.count("linear_attention") == 3
    groups = part_parameters(model, adapter)
    assert groups["projector"] and all(n.startswith("model.visual.merger.") for n, _ in groups["projector"])
    assert {n for n, _ in groups["vision"]} | {n for n, _ in groups["projector"]} == {
        n for n, _ in model.named_parameters() if n.startswith("model.visual.")}
    parts = adapter.parts(model)
    set_trainable(model, adapter, ModelConfig())
    targets = target_modules(model, parts, ModelConfig(lora_rank=4))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and n.startswith("model.language_model.layers.") and not n.endswith("shared_expert_gate")]
    assert sorted(linear) == targets  # every projection of both layer kinds (MoE: the shared expert's, not its
    # one-output gate; the routed experts are fused 3-d parameters, not linear layers)
    assert any(".linear_attn.in_proj_qkv" in t for t in targets) and any(".self_attn.q_proj" in t for t in targets)

    enable_checkpointing(model, adapter, ModelConfig())
    assert all(layer.gradient_checkpointing for layer in parts.llm_decoder.layers)


def test_unsupported_model_type_lists_the_families(tmp_path):
    from ds_vlm.models import GenericAdapter, UnsupportedModel

    with pytest.raises(UnsupportedModel, match="model type 'bert' is not supported") as err:
        adapter_for("bert")  # not an image-text-to-text type
    for family in FAMILIES:
        assert family in str(err.value)
    assert isinstance(adapter_for("paligemma"), GenericAdapter)  # an image-text-to-text type without an adapter
    from ds_vlm.demo import build_model_dir

    with pytest.raises(ValueError, match="unknown family 'mllama'"):
        build_model_dir(tmp_path, family="mllama")


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_sequence_parallelism_with_the_router_aux_loss_is_refused_by_name(family, family_models):
    """transformers computes the router's aux loss inside the forward from the whole sequence's mask and, under
    sequence parallelism, one rank's router logits (a shape error mid-step): a config asking for it is refused
    at load with the way out; without it, sequence parallelism is not refused."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(family_models(family))
    text = config.get_text_config()
    text.output_router_logits, text.router_aux_loss_coef = True, 0.001
    reason = adapter_for(family).sequence_parallel_refusal(config)
    assert reason.startswith("--sequence_parallel with the router's auxiliary loss") and "set output_router_logits" \
        in reason
    text.output_router_logits = False
    assert adapter_for(family).sequence_parallel_refusal(config) == ""
    assert adapter_for("qwen3_5").sequence_parallel_refusal(config) == ""


def test_expert_parallelism_keeps_the_router_aux_loss(family_models):
    """A config asking for the router's aux loss is no longer refused under --expert_parallel: the patch
    `autoep_router_logits_recorder` points transformers' recorder at AutoEP's router gates (tests/dist/
    test_expert.py: the aux loss of EP 2 equals EP 1's)."""
    from transformers import AutoConfig

    from ds_vlm.parallel.expert import fill_autoep_section

    config = AutoConfig.from_pretrained(family_models("qwen3_vl_moe"))
    text = config.get_text_config()
    text.output_router_logits, text.router_aux_loss_coef = True, 0.001
    ds = {"expert_parallel": {"enabled": True, "autoep_size": 2}}
    assert fill_autoep_section(ds, adapter_for("qwen3_vl_moe"), config, export_hf=False)["preset_model"] == "qwen3_moe"


def test_load_refuses_what_would_not_be_exact(family_models):
    """Gemma 3 packed or sequence-parallel is refused at load with the reason, before any weight is read; the
    generic path's plain causal towers (LLaVA-OneVision) are not."""
    from ds_vlm.config import ConfigError
    from ds_vlm.models.loading import load_model
    from ds_vlm.train.ds_config import DSSettings

    ds = DSSettings()  # ZeRO-0, fp32
    gemma = ModelConfig(path=str(family_models("gemma3")))
    with pytest.raises(ConfigError, match="--packing: gemma3: image tokens attend both ways"):
        load_model(gemma, ds, "sdpa", packing=True)
    with pytest.raises(ConfigError, match="--sequence_parallel: gemma3: the model builds its sliding-window"):
        load_model(gemma, ds, "sdpa", sequence_parallel=object())
    onevision = adapter_for("llava_onevision")
    config = json.loads((family_models("llava_onevision") / "config.json").read_text())
    from transformers import AutoConfig

    hf = AutoConfig.for_model(**config)
    assert onevision.packing_refusal(hf) == onevision.sequence_parallel_refusal(hf) == ""


def test_prepare_for_training_is_the_one_sequence(family_models, monkeypatch):
    """prepare_for_training: the family's changes (left out for the baselines), no KV cache, the trainable parts,
    LoRA where asked (peft's wrapper is what trains), checkpointing as the config says, the SP slicing."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.models.loading import prepare_for_training

    path = family_models("qwen3_vl")
    calls = []
    monkeypatch.setattr(QwenVLAdapter, "prepare", lambda self, model: calls.append("prepare"))

    class Slicing:
        def install(self, decoder, adapter):
            calls.append("sp")

    plain = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    adapter = adapter_for(plain.config.model_type)
    prepared = prepare_for_training(plain, adapter, ModelConfig(), family_changes=False, checkpointing=False)
    assert calls == [] and prepared.trained is plain and prepared.lora is None
    assert plain.config.get_text_config().use_cache is False and not plain.model.language_model.gradient_checkpointing
    assert prepared.groups["llm"] and not any(p.requires_grad for _, p in prepared.groups["vision"])
    lora = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    prepared = prepare_for_training(lora, adapter, ModelConfig(lora_rank=4), sequence_parallel=Slicing())
    assert calls == ["prepare", "sp"] and prepared.trained is not lora and prepared.lora is not None
    assert lora.model.language_model.gradient_checkpointing  # --gradient_checkpointing's default
    assert all("lora_" in n for n, p in prepared.trained.named_parameters() if p.requires_grad and "lm_head" not in n
               and "merger" not in n), [n for n, p in prepared.trained.named_parameters() if p.requires_grad][:5]
