"""The attention kernel each machine gets, the varlen interface on a CPU, PyTorch's varlen kernel called as the
installed torch allows."""

from __future__ import annotations

import sys

import pytest
import torch
from fixtures.encoding import packing_setup
from fixtures.numerics import assert_same, loss_and_grads

from ds_vlm.models import adapter_for
from ds_vlm.models.base import set_use_cache
from ds_vlm.train.loss import LabelLoss, LabelRows


def test_varlen_interface_on_cpu(demo_dir, packing_records, monkeypatch):
    """The packed path as the trainer runs it: the model loaded with the varlen interface and its adapter's
    preparation, the sample boundaries handed to the language model only. On a CPU each sample attends within
    itself through sdpa with no mask at all (never an L x L one, spied on every call); the loss and gradients
    equal sdpa with transformers' block-diagonal mask; the vision tower gets its images' boundaries (non-causal).
    Unarmed, a packed row is plain sdpa with that mask (the same loss)."""
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import sdpa_attention

    from ds_vlm.parallel.attention import VARLEN, SampleBoundaries, resolve_attention

    sdpa_masks, varlen_calls = [], []
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy_sdpa(*args, attn_mask=None, **kwargs):
        sdpa_masks.append(attn_mask)
        return original_sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    model, dataset, _, packed = packing_setup(demo_dir / "model", packing_records)
    expected = loss_and_grads(model, packed([dataset[i] for i in (0, 1, 2)]))
    assert resolve_attention("auto", packing=True, cuda=False) == VARLEN
    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model", dtype=torch.float32,
                                                        attn_implementation=VARLEN)
    adapter = adapter_for("qwen3_vl")
    adapter.prepare(model)
    set_use_cache(model.config, False)
    model.train()
    import ds_vlm.parallel.attention as attention

    original_varlen = attention._per_sample_sdpa

    def spy_varlen(q, k, v, cu, scale, causal):
        varlen_calls.append((q.shape[1], causal, len(cu) - 1))  # (1, heads, L, dim)
        return original_varlen(q, k, v, cu, scale, causal)

    monkeypatch.setattr(attention, "_per_sample_sdpa", spy_varlen)
    boundaries = SampleBoundaries(adapter.parts(model).llm_decoder, stand_in_mask=True)
    micro = packed([dataset[i] for i in (0, 1, 2)])
    rows = LabelRows.from_labels(micro.labels)
    sdpa_masks.clear()
    with boundaries.armed(micro.cu_seq_lens, micro.max_length):
        loss = LabelLoss(model).loss_of(model, micro.inputs, rows)
    loss.backward()
    got = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert_same(got, expected)
    assert sdpa_masks and all(m is None for m in sdpa_masks)  # no mask built anywhere, vision tower included
    text_heads, vision_heads = model.config.text_config.num_attention_heads, model.config.vision_config.num_heads
    text = [c for c in varlen_calls if c[0] == text_heads and c[1]]
    vision = [c for c in varlen_calls if c[0] == vision_heads and not c[1]]
    assert len(text) == model.config.text_config.num_hidden_layers and all(c[2] == 3 for c in text)
    assert len(vision) == model.config.vision_config.depth and all(c[2] == 3 for c in vision)  # 3 images
    varlen_calls.clear()
    with torch.no_grad():
        unarmed = LabelLoss(model).loss_of(model, micro.inputs, rows)
    torch.testing.assert_close(unarmed, expected[0], rtol=1e-5, atol=0)
    assert not [c for c in varlen_calls if c[1]]  # the language model fell back to sdpa with the mask


@pytest.mark.parametrize("signature", ["window_size, scale, enable_gqa", "is_causal only"])
def test_torch_varlen_call_adapts_to_the_installed_signature(signature, monkeypatch):
    """PyTorch's varlen_attn gained scale, window_size and enable_gqa after 2.10 (2.9-2.10 take is_causal):
    the call uses what this torch offers (causal via either; grouped-query heads repeated where enable_gqa is
    missing) and gives per-sample causal attention either way."""
    import torch.nn.attention.varlen as varlen

    import ds_vlm.parallel.attention as attention

    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
            enable_gqa=False):
        assert enable_gqa == (k.shape[1] != q.shape[1]) and window_size in ((-1, 0), (-1, -1))
        return reference(q, k, v, cu_q, scale, window_size == (-1, 0))

    def old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert k.shape[1] == q.shape[1]  # no enable_gqa: the kv heads must come repeated
        return reference(q, k, v, cu_q, None, is_causal)

    def reference(q, k, v, cu, scale, causal):  # (L, heads, dim) as varlen_attn takes them
        out = attention._per_sample_sdpa(*(t.transpose(0, 1)[None] for t in (q, k, v)), cu, scale, causal)
        return out[0]

    monkeypatch.setattr(varlen, "varlen_attn", new if signature.startswith("window") else old)
    attention.torch_varlen_signature.cache_clear()
    try:
        q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
        cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        out = attention._torch_varlen(q, k, v, cu, 7, 8 ** -0.5, True)
        first = torch.nn.functional.scaled_dot_product_attention(
            q[:3].transpose(0, 1), k[:3].repeat_interleave(2, 1).transpose(0, 1),
            v[:3].repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[:3], first)
        if signature == "is_causal only":
            with pytest.raises(ValueError, match="takes no scale"):
                attention._torch_varlen(q, k, v, cu, 7, 0.5, True)
    finally:
        attention.torch_varlen_signature.cache_clear()


def test_the_attention_kernel_each_machine_gets(monkeypatch):
    """auto: packed rows on the varlen interface (CPU: per-sample sdpa; CUDA: flash-attention 2 where installed,
    else PyTorch's varlen kernel, else sdpa with the mask, said once); unpacked batches on sdpa (flash-attention 2
    would unpad a padded batch with host reads in every layer)."""
    import ds_vlm.parallel.attention as attention

    ampere = (8, 0)
    monkeypatch.setattr(attention, "has_flash_attn", lambda: False)
    assert attention.resolve_attention("auto", packing=True, cuda=False) == attention.VARLEN
    assert attention.resolve_attention("auto", packing=False, cuda=False) == "sdpa"
    assert attention.resolve_attention("auto", packing=True, cuda=True, capability=ampere) == attention.VARLEN
    assert attention.resolve_attention("auto", packing=False, cuda=True, capability=ampere) == "sdpa"
    monkeypatch.setattr(attention, "torch_varlen_signature", lambda: None)  # torch < 2.9
    assert attention.resolve_attention("auto", packing=True, cuda=True, capability=ampere) == "sdpa"
    monkeypatch.setattr(attention, "has_flash_attn", lambda: True)
    assert attention.resolve_attention("auto", packing=True, cuda=True, capability=ampere) == "flash_attention_2"
    assert attention.resolve_attention("varlen", packing=True, cuda=True, capability=ampere) == "flash_attention_2"
    assert attention.resolve_attention("auto", packing=False, cuda=True, capability=ampere) == "sdpa"
    assert attention.resolve_attention("auto", packing=True, cuda=False) == attention.VARLEN
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        attention.resolve_attention("flash_attention_2", cuda=False)


@pytest.mark.parametrize("dtype,capability,why", [
    (torch.float32, (9, 0), "fp16/bf16 only and this run is float32"),
    (torch.bfloat16, (7, 0), "compute capability 8.0+ (Ampere) and this GPU is 7.0"),
    (torch.float16, (7, 5), "this GPU is 7.5"),
])
def test_flash_kernels_are_never_chosen_where_they_cannot_run(monkeypatch, dtype, capability, why):
    """The flash/varlen kernels take fp16/bf16 on compute capability 8.0+ only: a packed fp32 run, or any packed run
    on a V100/T4, gets the per-sample sdpa path of the varlen interface (said once), and flash_attention_2 asked
    for by name is refused with the reason. Half precision on Ampere keeps the kernels."""
    import ds_vlm.parallel.attention as attention

    monkeypatch.setattr(attention, "has_flash_attn", lambda: True)
    assert attention.flash_unusable(dtype, capability).endswith(why.split(" and ")[-1])
    for choice in ("auto", "varlen"):
        assert attention.resolve_attention(choice, packing=True, cuda=True, dtype=dtype,
                                           capability=capability) == attention.VARLEN
    assert "per-sample sdpa" in attention.kernel_description(attention.VARLEN, cuda=True, dtype=dtype,
                                                             capability=capability)
    with pytest.raises(ValueError, match="cannot run here"):
        attention.resolve_attention("flash_attention_2", packing=True, cuda=True, dtype=dtype, capability=capability)
    assert attention.flash_unusable(torch.bfloat16, (8, 0)) == attention.flash_unusable(torch.float16, (9, 0)) == ""
    assert attention.resolve_attention("auto", packing=True, cuda=True, dtype=torch.bfloat16,
                                       capability=(9, 0)) == "flash_attention_2"


def test_a_flash_attn_that_does_not_load_is_not_offered(tmp_path, monkeypatch):
    """A flash-attn wheel built for another torch is found by name but fails at import: not offered."""
    import ds_vlm.parallel.attention as attention

    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "flash_attn_interface.py").write_text("raise ImportError('undefined symbol: _ZN3c10...')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    attention.has_flash_attn.cache_clear()
    try:
        assert not attention.has_flash_attn()
        (package / "flash_attn_interface.py").write_text("")
        for name in ("flash_attn", "flash_attn.flash_attn_interface"):
            sys.modules.pop(name, None)
        attention.has_flash_attn.cache_clear()
        assert attention.has_flash_attn()
    finally:
        for name in ("flash_attn", "flash_attn.flash_attn_interface"):
            sys.modules.pop(name, None)
        attention.has_flash_attn.cache_clear()
