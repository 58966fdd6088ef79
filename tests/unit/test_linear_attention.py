"""Packed samples kept apart in Qwen3.5's Gated DeltaNet layers (linear_attention.py): on a CPU one sample at a
time, on FLA's varlen kernels where they are installed (stood in for here), never a leak across samples."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import ds_vlm.parallel.linear_attention as linear_attention
from ds_vlm.parallel.attention import VARLEN, SampleBoundaries, register_varlen
from ds_vlm.testing.hybrid import tiny_hybrid_text_config

LENGTHS = (70, 45)  # A longer than the delta rule's 64-token chunk, B shorter


@pytest.fixture(params=["dense"])
def hybrid(request):
    """(the tiny hybrid Qwen3.5 causal LM (or Qwen3.5-MoE's, param "moe") on the varlen interface, in train mode
    and fp32; SampleBoundaries on its language model; samples A and B as token ids)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM

    torch.manual_seed(0)
    register_varlen()
    moe = request.param == "moe"
    config = tiny_hybrid_text_config(moe=moe)
    config._attn_implementation = VARLEN
    model = (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(config).float().train()
    boundaries = SampleBoundaries(model.model, stand_in_mask=True)
    samples = [torch.randint(0, config.vocab_size, (1, n)) for n in LENGTHS]
    return model, boundaries, samples


def token_losses(model, ids, positions=None):
    """Per-token next-token losses of one row, [L - 1]."""
    logits = model(input_ids=ids, position_ids=positions).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="none")


def loss_and_grads(model, losses):
    model.zero_grad()
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_row(samples):
    ids = torch.cat(samples, dim=1)
    positions = torch.cat([torch.arange(s.shape[1]) for s in samples])[None]
    cu = torch.tensor([0, *torch.tensor([s.shape[1] for s in samples]).cumsum(0).tolist()], dtype=torch.int32)
    return ids, positions, cu


def each_sample_in_the_row(model, boundaries, samples, armed=True):
    """Each sample's per-token losses and gradients, taken from the packed row (the losses of the tokens that
    predict within the sample only: the row's token that predicts across the boundary is left out)."""
    ids, positions, cu = packed_row(samples)
    results = []
    for i, sample in enumerate(samples):
        start, end = int(cu[i]), int(cu[i + 1])
        if armed:
            with boundaries.armed(cu, max(s.shape[1] for s in samples)):
                losses = token_losses(model, ids, positions)
        else:
            losses = token_losses(model, ids, positions)
        results.append(loss_and_grads(model, losses[start:end - 1]))
    return results


def assert_close_results(got, expected):
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-6 * max(1.0, float(grad.abs().max())),
                                   msg=name)


@pytest.mark.parametrize("hybrid", ["dense", "moe"], indirect=True)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_then_b_equals_each_alone(hybrid, checkpointing):
    """A packed row of A and B gives each the per-token losses and gradients it has alone (fp32), on a CPU, in
    Qwen3.5's and Qwen3.5-MoE's towers: the per-sample path restarts the conv window and the recurrent state at
    B's first token. With activation checkpointing the recomputed layers see the boundaries too."""
    model, boundaries, samples = hybrid
    if checkpointing:
        model.activation_checkpointing_enable()
    assert linear_attention.linear_attention_path(torch.device("cpu")) == linear_attention.PER_SAMPLE
    assert all(isinstance(m, linear_attention.SampleAwareLinearAttention)
               for m in linear_attention.linear_attention_layers(model.model))
    alone = [loss_and_grads(model, token_losses(model, s)) for s in samples]
    for got, expected in zip(each_sample_in_the_row(model, boundaries, samples), alone):
        assert_close_results(got, expected)


def test_without_the_boundaries_b_reads_a(hybrid):
    """The check above can fail: the same row without the boundaries (full attention still kept per sample by
    transformers' block-diagonal mask from the positions) lets B read A through the Gated DeltaNet layers'
    conv and state: B's losses differ from B alone."""
    model, boundaries, samples = hybrid
    b_alone = token_losses(model, samples[1]).detach()
    _, b_in_row = each_sample_in_the_row(model, boundaries, samples, armed=False)
    assert (b_in_row[0] - b_alone).abs().max() > 1e-3


def test_the_patch_is_transformers_layer_without_boundaries(hybrid):
    """Patched, a layer keeps its class (isinstance), its parameter names and its forward when unarmed (a
    padded batch, generation); installing twice changes nothing."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    model, _, samples = hybrid
    layer = model.model.layers[0].linear_attn
    assert isinstance(layer, Qwen3_5GatedDeltaNet) and type(layer).__name__ == "SampleAwareQwen3_5GatedDeltaNet"
    assert linear_attention.install(model.model) == 2 and type(model.model.layers[0].linear_attn) is type(layer)
    hidden = torch.randn(2, 9, 64)
    expected = Qwen3_5GatedDeltaNet.forward(layer, hidden)
    torch.testing.assert_close(layer(hidden), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one packed row"):
        layer(hidden, cu_seq_lens_q=torch.tensor([0, 4, 9], dtype=torch.int32))


def test_each_submodule_runs_once_however_many_samples(hybrid):
    """ZeRO-3 gathers a submodule's weights at each of its calls: ranks whose packed rows hold different numbers of
    samples must still call each one equally often (running the layer's whole forward per sample hung a 2-rank
    ZeRO-3 run). One call each, for a row of 1 sample and of 3."""
    model, _, _ = hybrid
    layer = model.model.layers[0].linear_attn
    calls = []
    for child in layer.children():
        child.register_forward_pre_hook(lambda module, args, name=type(child).__name__: calls.append(name))
    hidden = torch.randn(1, 30, 64)
    for cu in ([0, 30], [0, 10, 18, 30]):
        calls.clear()
        layer(hidden, cu_seq_lens_q=torch.tensor(cu, dtype=torch.int32))
        assert sorted(calls) == sorted(["Linear"] * 5 + ["Qwen3_5RMSNormGated"]), calls


def test_unknown_linear_attention_layers_are_refused():
    """A config that says linear_attention over layers of a class the patch was not written for is refused
    (packing would leak), not run unbounded."""
    class Layer(torch.nn.Module):
        pass

    model = torch.nn.Module()
    model.config = types.SimpleNamespace(layer_types=["linear_attention", "full_attention"])
    model.layers = torch.nn.ModuleList([Layer(), Layer()])
    with pytest.raises(ValueError, match="leak across samples"):
        linear_attention.install(model)


# --------------------------------------------------------------------------- the varlen-kernel path, stood in for

def fake_kernel_packages(monkeypatch, calls):
    """Importable `causal_conv1d` and `fla.ops.gated_delta_rule` whose functions take the real packages'
    signatures (causal-conv1d 1.7.0, fla-core 0.6.0) and check what the varlen path gives them, computing with
    transformers' torch functions one sample at a time (what the real kernels do on a GPU)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    torch_conv = modeling.causal_conv1d_fn.__wrapped__
    torch_rule = modeling.torch_chunk_gated_delta_rule.__wrapped__

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        assert seq_idx is not None and seq_idx.dtype == torch.int32 and seq_idx.shape == (1, x.shape[-1])
        assert seq_idx.device == x.device and x.stride(1) == 1  # causal-conv1d takes seq_idx channel-last only
        calls.append(("conv", seq_idx.clone()))
        counts = torch.unique_consecutive(seq_idx[0], return_counts=True)[1].tolist()
        return torch.cat([torch_conv(part, weight, bias, activation=activation)
                          for part in torch.split(x, counts, dim=-1)], dim=-1)

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, cp_context=None, **kwargs):
        assert cu_seqlens is not None and cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1
        assert cu_seqlens.device == q.device and q.shape[0] == 1 and int(cu_seqlens[-1]) == q.shape[1]
        calls.append(("rule", cu_seqlens.clone()))
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        parts = [torch_rule(*args, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)[0]
                 for args in zip(*(torch.split(t, lengths, dim=1) for t in (q, k, v, g, beta)))]
        return torch.cat(parts, dim=1), None

    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn = causal_conv1d_fn
    fla, ops, rule = (types.ModuleType(n) for n in ("fla", "fla.ops", "fla.ops.gated_delta_rule"))
    rule.chunk_gated_delta_rule = chunk_gated_delta_rule
    fla.ops, ops.gated_delta_rule = ops, rule
    for module in (conv, fla, ops, rule):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    linear_attention.varlen_kernels_installed.cache_clear()
    return modeling


def test_varlen_kernel_path_with_stand_ins(hybrid, monkeypatch):
    """Where FLA and causal-conv1d are installed (stand-ins here, resolved through transformers' own kernel
    wrapper, which keeps only the kwargs each signature takes), one forward over the row hands the conv `seq_idx`
    (int32 [1, L], channel-last input) and the delta rule `cu_seqlens` (int32 [samples + 1], the row's device):
    each sample's losses and gradients equal it alone."""
    from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

    model, boundaries, samples = hybrid
    calls = []
    modeling = fake_kernel_packages(monkeypatch, calls)
    try:
        assert linear_attention.varlen_kernels_installed()
        conv = use_kernel_func_from_hub_with_fallback("causal_conv1d_fn", "causal_conv1d")(
            modeling.causal_conv1d_fn.__wrapped__)
        rule = use_kernel_func_from_hub_with_fallback("chunk_gated_delta_rule", "fla")(
            modeling.torch_chunk_gated_delta_rule.__wrapped__)
        alone = [loss_and_grads(model, token_losses(model, s)) for s in samples]  # torch functions, unpacked
        monkeypatch.setattr(modeling, "causal_conv1d_fn", conv)
        monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", rule)
        monkeypatch.setattr(linear_attention, "linear_attention_path", lambda device: linear_attention.VARLEN_KERNELS)
        results = each_sample_in_the_row(model, boundaries, samples)
    finally:
        monkeypatch.undo()
        linear_attention.varlen_kernels_installed.cache_clear()
    for got, expected in zip(results, alone):
        assert_close_results(got, expected)
    n_linear = len(linear_attention.linear_attention_layers(model.model))
    cu = torch.tensor([0, LENGTHS[0], sum(LENGTHS)], dtype=torch.int32)
    rules = [c[1] for c in calls if c[0] == "rule"]
    assert len(rules) == 2 * n_linear and all(torch.equal(r, cu) for r in rules)  # a forward per sample checked
    seq_idx = torch.cat([torch.zeros(LENGTHS[0]), torch.ones(LENGTHS[1])]).int()[None]
    assert all(torch.equal(c[1], seq_idx) for c in calls if c[0] == "conv")


def test_the_path_each_machine_takes(monkeypatch):
    """Varlen kernels on CUDA with both packages; one sample at a time on a CPU whatever is installed, and on
    CUDA without them."""
    monkeypatch.setattr(linear_attention, "varlen_kernels_installed", lambda: True)
    assert linear_attention.linear_attention_path(torch.device("cuda")) == linear_attention.VARLEN_KERNELS
    assert linear_attention.linear_attention_path(torch.device("cpu")) == linear_attention.PER_SAMPLE
    monkeypatch.setattr(linear_attention, "varlen_kernels_installed", lambda: False)
    assert linear_attention.linear_attention_path(torch.device("cuda")) == linear_attention.PER_SAMPLE


def test_kernels_found_as_transformers_looks_for_them(monkeypatch):
    """Both packages must import with their functions: FLA alone (no causal-conv1d) is not enough, since
    transformers' torch conv cannot take `seq_idx`."""
    calls = []
    fake_kernel_packages(monkeypatch, calls)
    try:
        assert linear_attention.varlen_kernels_installed()
        linear_attention.varlen_kernels_installed.cache_clear()
        monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # import fails
        assert not linear_attention.varlen_kernels_installed()
    finally:
        monkeypatch.undo()
        linear_attention.varlen_kernels_installed.cache_clear()


def test_sequence_index_and_segments():
    """seq_idx from the boundaries on their device (tokens past the last boundary their own sample), and the
    per-sample split (empty samples dropped, a tail kept)."""
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    assert linear_attention.sequence_index(cu, 9).tolist() == [[0, 0, 0, 2, 2, 2, 2, 3, 3]]
    assert linear_attention.sequence_index(cu, 9).dtype == torch.int32
    assert linear_attention.segment_lengths(cu, 9) == [3, 4, 2]
    assert linear_attention.segment_lengths(cu, 7) == [3, 4]


# --------------------------------------------------------------------------- the whole VLM

IMAGE, START, END = 120, 121, 122  # the tiny VLM's image-pad, vision-start and vision-end ids


def tiny_vlm():
    """A tiny Qwen3.5 VLM (vision tower, merger, the hybrid language tower) on the varlen interface."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = tiny_hybrid_text_config().to_dict()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                               "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64, "num_position_embeddings": 64}
    config = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=123,
                           vision_start_token_id=START, vision_end_token_id=END)
    register_varlen()
    config._attn_implementation = VARLEN
    torch.manual_seed(0)
    return Qwen3_5ForConditionalGeneration(config).float().train()


def vlm_sample(n_text: int, grid: tuple[int, int] | None):
    """input_ids [1, L] (text, then an image of `grid` patches (h, w) if any, then text), its
    mm_token_type_ids, and the pixels and grid of the image."""
    image = [] if grid is None else [START] + [IMAGE] * (grid[0] * grid[1] // 4) + [END]
    ids = torch.tensor([torch.randint(0, 100, (n_text // 2,)).tolist() + image
                        + torch.randint(0, 100, (n_text - n_text // 2,)).tolist()])
    sample = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE).int()}
    if grid is not None:
        sample["pixel_values"] = torch.randn(grid[0] * grid[1], 3 * 2 * 4 * 4)
        sample["image_grid_thw"] = torch.tensor([[1, *grid]])
    return sample


def vlm_losses(model, inputs, spans):
    """The summed next-token loss within each (row, start, end) span: no prediction across samples or padding."""
    logits = model(**inputs).logits.float()
    ids = inputs["input_ids"]
    return sum(torch.nn.functional.cross_entropy(logits[row, start:end - 1], ids[row, start + 1:end], reduction="sum")
               for row, start, end in spans)


def test_packed_equals_padded_on_the_vlm():
    """The whole tiny Qwen3.5 VLM, an image sample then a text-only one: packed in one row (position ids per
    sample, the boundaries armed) gives the loss and every gradient of the same two padded in a batch (fp32)."""
    model = tiny_vlm()
    boundaries = SampleBoundaries(model.model.language_model, stand_in_mask=True)
    samples = [vlm_sample(60, (4, 8)), vlm_sample(40, None)]
    lengths = [s["input_ids"].shape[1] for s in samples]
    width = max(lengths)

    def pad(t, value=0):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    padded = {"input_ids": torch.cat([pad(s["input_ids"]) for s in samples]),
              "mm_token_type_ids": torch.cat([pad(s["mm_token_type_ids"]) for s in samples]),
              "attention_mask": torch.cat([pad(torch.ones(1, n, dtype=torch.long)) for n in lengths]),
              "pixel_values": samples[0]["pixel_values"], "image_grid_thw": samples[0]["image_grid_thw"]}
    model.zero_grad()
    loss = vlm_losses(model, padded, [(i, 0, n) for i, n in enumerate(lengths)])
    loss.backward()
    expected = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    positions = []
    for s in samples:  # each sample's multimodal rope index, with the text row in front
        mrope, _ = model.model.get_rope_index(s["input_ids"], s["mm_token_type_ids"], s.get("image_grid_thw"))
        positions.append(torch.cat([torch.arange(s["input_ids"].shape[1])[None, None], mrope]))
    packed = {"input_ids": torch.cat([s["input_ids"] for s in samples], 1),
              "mm_token_type_ids": torch.cat([s["mm_token_type_ids"] for s in samples], 1),
              "position_ids": torch.cat(positions, dim=2),
              "pixel_values": samples[0]["pixel_values"], "image_grid_thw": samples[0]["image_grid_thw"]}
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    model.zero_grad()
    with boundaries.armed(cu, width):
        loss = vlm_losses(model, packed, [(0, 0, lengths[0]), (0, lengths[0], sum(lengths))])
    loss.backward()
    got = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_close_results(got, expected)


# --------------------------------------------------------------------------- the sequence-parallel forward, one rank

def test_the_sequence_parallel_forward_is_the_layer(hybrid, monkeypatch):
    """The patch's sequence-parallel forward (transformers' forward around two all-to-alls) in one process (a
    group of one, the exchange a copy): the layer's own output, unpacked; with a packed row's boundaries the
    per-sample output, on the per-sample path and on the varlen kernels (stand-ins) alike. The 2-rank check is
    tests/dist/test_linear_attention.py."""
    from ds_vlm.parallel.ulysses import SLICED

    model, _, _ = hybrid
    layer = model.model.layers[0].linear_attn
    layer.sequence_parallel = types.SimpleNamespace(size=1, rank=0, group=None)
    hidden = torch.randn(1, sum(LENGTHS), 64)
    cu = torch.tensor([0, LENGTHS[0], sum(LENGTHS)], dtype=torch.int32)
    torch.testing.assert_close(layer(hidden, **{SLICED: True}), layer(hidden), rtol=1e-6, atol=1e-6)
    per_sample = layer(hidden, cu_seq_lens_q=cu)
    torch.testing.assert_close(layer(hidden, cu_seq_lens_q=cu, **{SLICED: True}), per_sample, rtol=1e-6, atol=1e-6)
    calls = []
    modeling = fake_kernel_packages(monkeypatch, calls)
    try:
        from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

        monkeypatch.setattr(modeling, "causal_conv1d_fn", use_kernel_func_from_hub_with_fallback(
            "causal_conv1d_fn", "causal_conv1d")(modeling.causal_conv1d_fn.__wrapped__))
        monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", use_kernel_func_from_hub_with_fallback(
            "chunk_gated_delta_rule", "fla")(modeling.torch_chunk_gated_delta_rule.__wrapped__))
        monkeypatch.setattr(linear_attention, "linear_attention_path", lambda device: linear_attention.VARLEN_KERNELS)
        on_kernels = layer(hidden, cu_seq_lens_q=cu, **{SLICED: True})
    finally:
        monkeypatch.undo()
        linear_attention.varlen_kernels_installed.cache_clear()
    torch.testing.assert_close(on_kernels, per_sample, rtol=1e-6, atol=1e-6)
    assert [c[0] for c in calls] == ["conv", "rule"]
