"""The label-row loss: chunked equals the full-logits loss for every family; liger's wrapper on a stand-in kernel."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from fixtures.numerics import assert_same, full_logits_loss_sum

from ds_vlm.data.batching import Collator, SFTDataset
from ds_vlm.data.encode import Encoder
from ds_vlm.data.sources import RecordIndex
from ds_vlm.demo import FAMILIES
from ds_vlm.models import adapter_for
from ds_vlm.train.loss import LabelLoss, LabelRows


def _batch(model_dir: Path, data: Path, indices: list[int]):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    family = json.loads((model_dir / "config.json").read_text())["model_type"]
    encoder = Encoder(processor, adapter_for(family), 4096)
    dataset = SFTDataset(RecordIndex([str(data)]), encoder)
    return Collator(encoder.tokenizer.pad_token_id, encoder.dummy())([dataset[i] for i in indices])


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_full_logits_loss(family, family_models, mixed_data, monkeypatch):
    """Value and every parameter's gradient, fp32, several chunks; an image sample and a text-only one."""
    from transformers import AutoModelForImageTextToText

    import ds_vlm.train.loss

    model_dir = family_models(family)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    micro = _batch(model_dir, mixed_data, [0, 1, 2])  # records 1 is text-only
    rows = LabelRows.from_labels(micro.labels)
    assert len(rows) > 10

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = loss_and_grads(lambda: full_logits_loss_sum(model(**micro.inputs).logits, micro.labels))
    monkeypatch.setattr(ds_vlm.train.loss, "CHUNK_BYTES", 4 * model.config.get_text_config().vocab_size * 3)  # 3 rows
    chunked = loss_and_grads(lambda: LabelLoss(model, "chunked").loss_of(model, micro.inputs, rows))
    # each gradient relative to its own largest entry; one that is zero in exact arithmetic (a key bias under
    # softmax) holds fp32 noise only, so no scale below 1e-3 of the model's largest gradient entry is used
    assert_same(chunked, reference)
    assert len(reference[1]) > 10
    head = model.get_output_embeddings().weight
    untied = ("llava", "mistral3", "smolvlm", "idefics3", "glm46v")  # as released
    assert (head is model.get_input_embeddings().weight) == (family not in untied)
    # unarmed, the head is the plain head again: logits over every position, as generation needs
    assert model(**micro.inputs).logits.shape[:2] == micro.inputs["input_ids"].shape


def test_liger_wrapper_scales_gradients_without_a_host_sync(monkeypatch):
    """--loss liger through a stand-in for liger's forward (which computes the loss and its gradients at once,
    as the Triton kernel does): the loss and gradients equal the chunked loss's, the weight gradient is
    accumulated in fp32 (asked for), and the backward reads nothing back from the device."""
    from ds_vlm.train.loss import chunked_loss_sum, liger_loss_sum

    asked = {}

    def forward(hidden, weight, targets, bias=None, reduction="mean", accum_dtype=None, **kwargs):
        asked.update(reduction=reduction, accum_dtype=accum_dtype)
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss = torch.nn.functional.cross_entropy(h @ w.t(), targets, reduction="sum")
            grad_h, grad_w = torch.autograd.grad(loss, (h, w))
        return loss.detach(), None, None, None, grad_h, grad_w.to(accum_dtype), None

    ops = types.ModuleType("liger_kernel.ops.fused_linear_cross_entropy")
    ops.fused_linear_cross_entropy_forward = forward
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_linear_cross_entropy", ops)
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (6,))
    results = []
    for fn in (chunked_loss_sum, liger_loss_sum):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, None, targets)
        if fn is liger_loss_sum:
            monkeypatch.setattr(torch, "equal", lambda *a: pytest.fail("torch.equal: a host sync"))
            monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail(".item(): a host sync"))
        (loss * 0.25).backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    assert asked == {"reduction": "sum", "accum_dtype": torch.float32}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_liger_with_no_label_rows_gives_zero_loss_and_zero_gradients(monkeypatch):
    """A micro-batch with no label rows (a dummy at an epoch's end, an eval dummy, an SP slice without answer
    tokens) through --loss liger: liger 0.8.5 sizes its chunks from the row count and divides by zero before any
    kernel runs (the stand-in does what it does). ds-vlm never calls it with 0 rows: the loss is 0 and the
    gradients are zeros of the right shapes, so every ZeRO rank still reduces a head gradient."""
    from ds_vlm.train.loss import liger_loss_sum

    def forward(hidden, weight, targets, **kwargs):
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk_size = min(1 << 16, rows * vocab) // max(1, vocab)  # 0 rows: a chunk of 0
        (rows + chunk_size - 1) // chunk_size  # liger's cdiv(BT, chunk_size)
        raise AssertionError("unreachable with rows")

    ops = types.ModuleType("liger_kernel.ops.fused_linear_cross_entropy")
    ops.fused_linear_cross_entropy_forward = forward
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_linear_cross_entropy", ops)
    hidden = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    with pytest.raises(ZeroDivisionError):  # what liger itself does with no rows
        forward(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss = liger_loss_sum(hidden, weight, None, torch.zeros(0, dtype=torch.long))
    (loss * 0.5).backward()
    assert loss.dtype == torch.float32 and float(loss.detach()) == 0.0
    assert weight.grad.shape == weight.shape and not weight.grad.any()


def test_rows_whose_logits_fit_one_chunk_take_the_plain_path_with_the_same_loss():
    """Few label rows: the plain autograd path (no recompute in the backward), with the loss and gradients the
    chunked function gives over many chunks; more rows than one chunk holds: the chunked function."""
    import ds_vlm.train.loss as loss_mod

    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    results = []
    for compute in (lambda: loss_mod.chunked_loss_sum(hidden, weight, None, targets),
                    lambda: loss_mod._ChunkedLinearCrossEntropy.apply(hidden, weight, None, targets, 4 * 50 * 2)):
        hidden.grad = weight.grad = None
        out = compute()
        (out * 0.5).backward()
        results.append((out.detach(), hidden.grad.clone(), weight.grad.clone(), out.grad_fn.name()))
    assert "Chunked" not in results[0][3] and "Chunked" in results[1][3]
    for a, b in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # both compute the logits in fp32
    big = torch.randn(loss_mod.CHUNK_BYTES // (12 * 50) + 1, 16, requires_grad=True)
    assert "Chunked" in loss_mod.chunked_loss_sum(big, weight, None, torch.zeros(len(big), dtype=torch.long)
                                                  ).grad_fn.name()
