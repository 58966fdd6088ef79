"""--packing: a micro-batch as one row of its samples, each with its own positions. The loss and gradients equal
the padded batch's for every family, attention never crosses samples (with negative controls that show what a
leak looks like), a text-only row still runs the vision tower, and 2 ranks train the same with and without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_train

from ds_vlm.data.batching import Collator, SFTDataset, TokenBudgetPlan
from ds_vlm.data.encode import Encoder
from ds_vlm.data.sources import RecordIndex
from ds_vlm.demo import FAMILIES
from ds_vlm.loss import LabelLoss, LabelRows
from ds_vlm.models import adapter_for


@pytest.fixture(scope="module")
def records(demo_dir, tmp_path_factory) -> Path:
    """An image record, a text-only one, a two-image one, another image record (same length as the first)."""
    data = demo_dir / "data"
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:3]]
    images = [str(data / r["images"][0]) for r in rows]
    answer = rows[0]["conversations"][1]["value"]
    out = tmp_path_factory.mktemp("packing") / "records.jsonl"
    records = [
        {"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                           {"from": "gpt", "value": answer}], "images": [images[0]]},
        {"conversations": [{"from": "human", "value": "Say a caption."}, {"from": "gpt", "value": answer}]},
        {"conversations": [{"from": "human", "value": "<image> and <image>: what is in these pictures?"},
                           {"from": "gpt", "value": f"{answer} {rows[1]['conversations'][1]['value']}"}],
         "images": [images[1], images[2]]},
        {"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                           {"from": "gpt", "value": answer}], "images": [images[1]]},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def _setup(model_dir: Path, data: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.config.get_text_config().use_cache = False  # as engine.load_model does: a cache disables packing's mask
    model.train()
    adapter = adapter_for(model.config.model_type)
    encoder = Encoder(AutoProcessor.from_pretrained(model_dir), adapter, 4096)
    dataset = SFTDataset(RecordIndex([str(data)]), encoder)
    padded = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())
    packed = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), adapter.position_ids(model.config),
                       packing=True)
    return model, dataset, padded, packed


def _loss_and_grads(model, collated):
    batch, meta = collated
    batch = dict(batch)
    batch.pop("cu_seq_lens", None)  # sdpa here: the block-diagonal mask comes from the position ids
    rows = LabelRows.from_labels(batch.pop("labels"))
    model.zero_grad()
    loss = LabelLoss(model)(model, batch, rows)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, meta


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    largest = max(float(g.abs().max()) for g in b[1].values())
    assert a[1].keys() == b[1].keys()
    for name, grad in b[1].items():  # relative to each gradient's scale (see test_loss.py)
        scale = max(float(grad.abs().max()), 1e-3 * largest)
        torch.testing.assert_close(a[1][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded(family, family_models, records):
    """Loss and every gradient, fp32: an image sample, a text-only one and a two-image one in one micro-batch;
    then two text-only samples, where the packed row carries the dummy image as its own sample."""
    model, dataset, padded, packed = _setup(family_models(family), records)
    samples = [dataset[i] for i in (0, 1, 2)]
    reference, got = _loss_and_grads(model, padded(samples)), _loss_and_grads(model, packed(samples))
    _assert_same(got, reference)
    meta = got[2]
    assert meta["computed"] == meta["tokens"] == sum(s["input_ids"].shape[1] for s in samples)  # no padding
    text_only = [dataset[1], dataset[1]]
    reference, got = _loss_and_grads(model, padded(text_only)), _loss_and_grads(model, packed(text_only))
    _assert_same(got, reference)
    vision = adapter_for(family).parts(model).vision_blocks[0]
    assert any(p.grad is not None for p in vision.parameters())  # the vision tower ran (the dummy image)
    assert got[2]["computed"] > got[2]["tokens"]  # the dummy's tokens are computed, not counted


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batches_carry_host_positions_and_count_flops_as_packed(family, family_models, records, monkeypatch):
    """A padded batch with the adapter's positions computed on the host (the collator's, for every Qwen family)
    gives the loss and gradients of the model computing them itself, and the forward never calls the model's
    rope index (on a GPU it reads token types back to the host row by row). The same samples padded and packed
    count the same model FLOPs (attention within each sample, the real tokens only)."""
    from ds_vlm.config import TrainConfig
    from ds_vlm.metrics import FlopsCounter

    model, dataset, padded, packed = _setup(family_models(family), records)
    adapter = adapter_for(family)
    samples = [dataset[i] for i in (0, 1, 2)]
    reference = _loss_and_grads(model, padded(samples))
    if adapter.padded_batch_positions:  # as the trainer builds its collator (LLaVA: plain positions in the model)
        batch = Collator(padded.pad_token_id, padded.dummy, adapter.position_ids(model.config))(samples)
        assert batch[0]["position_ids"].shape[:2] == (4, 3)  # the text row and mrope's 3, per padded row
        with monkeypatch.context() as patch:
            patch.setattr(type(model.model), "get_rope_index",
                          lambda *a, **k: pytest.fail("the rope index was computed in the forward"))
            _assert_same(_loss_and_grads(model, batch), reference)
    counter = FlopsCounter(model, adapter, TrainConfig(model="m", train_data="d"))
    images = [dataset[0], dataset[2], dataset[3]]

    def flops(collated):
        return counter(collated[0], count_targets_of(collated), collated[1]["sample_lengths"])

    assert flops(padded(images)) == flops(packed(images)) > 0
    assert flops(padded(images)) < counter(padded(images)[0], count_targets_of(padded(images)),
                                           [padded(images)[0]["input_ids"].shape[1]] * 3)  # padding is not work


def count_targets_of(collated) -> int:
    return len(LabelRows.from_labels(collated[0]["labels"]))


def _token_losses(model, collated, **forward_kwargs) -> torch.Tensor:
    """Cross-entropy of every position that predicts a label, in order, from the full logits."""
    batch = dict(collated[0])
    batch.pop("cu_seq_lens", None)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, **forward_kwargs).logits[0, :-1]
    targets = labels[0, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="none")


def test_changing_one_sample_leaves_the_others_exactly_unchanged(demo_dir, records):
    """Qwen3-VL, fp32: rows [A, B] and [A, B'] (B' = B with another image, same length): A's per-token losses
    are bit-identical, and B's are not (so the check sees a change where there is one). Negative controls:
    with 3-row position ids (no text row) or with a KV cache, the same swap changes A's losses when A comes
    after B: attention crossed into B."""
    model, dataset, _, packed = _setup(demo_dir / "model", records)
    model.eval()
    a, b, b_other = dataset[0], dataset[3], dataset[0]
    assert b["input_ids"].shape == b_other["input_ids"].shape and not torch.equal(b["pixel_values"],
                                                                                  b_other["pixel_values"])
    n_a = int((a["labels"][0, 1:] != -100).sum())
    first, first_other = _token_losses(model, packed([a, b])), _token_losses(model, packed([a, b_other]))
    assert torch.equal(first[:n_a], first_other[:n_a]) and not torch.equal(first[n_a:], first_other[n_a:])
    second, second_other = _token_losses(model, packed([b, a])), _token_losses(model, packed([b_other, a]))
    assert torch.equal(second[-n_a:], second_other[-n_a:])
    torch.testing.assert_close(second[-n_a:], first[:n_a], rtol=1e-5, atol=1e-6)  # A alone, wherever it sits

    def leaks(**forward_kwargs) -> bool:
        x, y = (_token_losses(model, row, **forward_kwargs) for row in (packed([b, a]), packed([b_other, a])))
        return not torch.equal(x[-n_a:], y[-n_a:])

    three_rows = [packed([b, a]), packed([b_other, a])]
    for row in three_rows:
        row[0]["position_ids"] = row[0]["position_ids"][1:]
    x, y = (_token_losses(model, row) for row in three_rows)
    assert not torch.equal(x[-n_a:], y[-n_a:]), "3-row position ids should let attention cross samples"
    assert leaks(use_cache=True), "a KV cache should let attention cross samples"
    assert not leaks()


def test_token_budget_counts_real_tokens_when_packing():
    lengths = [30, 50, 70, 90, 110, 130, 150, 170] * 8
    padded = TokenBudgetPlan(len(lengths), 1, 1, 2, seed=0, lengths=lengths, max_tokens=400)
    packed = TokenBudgetPlan(len(lengths), 1, 1, 2, seed=0, lengths=lengths, max_tokens=400, packing=True)
    for plan, cost in ((padded, lambda mb: max(lengths[i] for i in mb) * len(mb)),
                       (packed, lambda mb: sum(lengths[i] for i in mb))):
        micro = plan.epoch_micro_batches(0)
        assert sorted(i for mb in micro for i in mb) == list(range(len(lengths)))
        assert all(cost(mb) <= 400 for mb in micro if len(mb) > 1)
    assert len(packed.epoch_micro_batches(0)) < len(padded.epoch_micro_batches(0))


@pytest.mark.dist
def test_two_ranks_zero3_packed_equals_padded(demo_dir, tmp_path):
    """2 ranks, ZeRO-3, micro-batch 4, answers of 1 to 3 sentences: the same step losses with --packing as
    without, and no padding computed."""
    rows = [json.loads(line) for line in (demo_dir / "data" / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["images"] = [str(demo_dir / "data" / row["images"][0])]
        row["conversations"][1]["value"] = " ".join([row["conversations"][1]["value"]] * (1 + i % 3))
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses, rows = {}, {}
    for name, extra in (("padded", []), ("packed", ["--packing"])):
        out = tmp_path / name
        proc = run_train(["--model", str(demo_dir / "model"), "--train_data", str(data),
                          "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--output_dir", str(out),
                          "--max_steps", "3", "--micro_batch_size", "4", "--lr", "1e-3", "--warmup_ratio", "0",
                          "--num_workers", "0", "--export_hf", "false", "--dist_timeout_s", "120", *extra])
        assert proc.returncode == 0, proc.stderr[-5000:]
        rows[name] = read_metrics(out)
        losses[name] = [r["loss"] for r in rows[name]]
    assert len(losses["packed"]) == 3
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-4)
    assert all(r["padding_efficiency"] >= 0.99 for r in rows["packed"])
    assert max(r["padding_efficiency"] for r in rows["padded"]) < 0.99  # the answers differ in length


def test_varlen_interface_on_cpu(demo_dir, records, monkeypatch):
    """The packed path as the trainer runs it: the model loaded with the varlen interface and its adapter's
    preparation, the sample boundaries handed to the language model only. On a CPU each sample attends within
    itself through sdpa with no mask at all (never an L x L one, spied on every call); the loss and gradients
    equal sdpa with transformers' block-diagonal mask; the vision tower gets its images' boundaries (non-causal).
    Unarmed, a packed row is plain sdpa with that mask (the same loss)."""
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import sdpa_attention

    from ds_vlm.attention import VARLEN, SampleBoundaries, resolve_attention

    sdpa_masks, varlen_calls = [], []
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy_sdpa(*args, attn_mask=None, **kwargs):
        sdpa_masks.append(attn_mask)
        return original_sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    model, dataset, _, packed = _setup(demo_dir / "model", records)
    expected = _loss_and_grads(model, packed([dataset[i] for i in (0, 1, 2)]))
    assert resolve_attention("auto", packing=True, cuda=False) == VARLEN
    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model", dtype=torch.float32,
                                                        attn_implementation=VARLEN)
    adapter = adapter_for("qwen3_vl")
    adapter.prepare(model)
    model.config.get_text_config().use_cache = False
    model.train()
    import ds_vlm.attention as attention

    original_varlen = attention._per_sample_sdpa

    def spy_varlen(q, k, v, cu, scale, causal):
        varlen_calls.append((q.shape[1], causal, len(cu) - 1))  # (1, heads, L, dim)
        return original_varlen(q, k, v, cu, scale, causal)

    monkeypatch.setattr(attention, "_per_sample_sdpa", spy_varlen)
    boundaries = SampleBoundaries(adapter.parts(model).llm_decoder, stand_in_mask=True)
    batch, meta = packed([dataset[i] for i in (0, 1, 2)])
    batch = dict(batch)
    rows = LabelRows.from_labels(batch.pop("labels"))
    sdpa_masks.clear()
    with boundaries.armed(batch.pop("cu_seq_lens"), meta["max_length"]):
        loss = LabelLoss(model)(model, batch, rows)
    loss.backward()
    got = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    _assert_same(got, expected)
    assert sdpa_masks and all(m is None for m in sdpa_masks)  # no mask built anywhere, vision tower included
    text_heads, vision_heads = model.config.text_config.num_attention_heads, model.config.vision_config.num_heads
    text = [c for c in varlen_calls if c[0] == text_heads and c[1]]
    vision = [c for c in varlen_calls if c[0] == vision_heads and not c[1]]
    assert len(text) == model.config.text_config.num_hidden_layers and all(c[2] == 3 for c in text)
    assert len(vision) == model.config.vision_config.depth and all(c[2] == 3 for c in vision)  # 3 images
    varlen_calls.clear()
    with torch.no_grad():
        unarmed = LabelLoss(model)(model, dict(batch), rows)
    torch.testing.assert_close(unarmed, expected[0], rtol=1e-5, atol=0)
    assert not [c for c in varlen_calls if c[1]]  # the language model fell back to sdpa with the mask


@pytest.mark.parametrize("signature", ["window_size, scale, enable_gqa", "is_causal only"])
def test_torch_varlen_call_adapts_to_the_installed_signature(signature, monkeypatch):
    """PyTorch's varlen_attn gained scale, window_size and enable_gqa after 2.10 (2.9-2.10 take is_causal):
    the call uses what this torch offers (causal via either; grouped-query heads repeated where enable_gqa is
    missing) and gives per-sample causal attention either way."""
    import torch.nn.attention.varlen as varlen

    import ds_vlm.attention as attention

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
    else PyTorch's varlen kernel, else sdpa with the mask, said once); unpacked batches on flash-attention 2
    where installed, else sdpa."""
    import ds_vlm.attention as attention

    monkeypatch.setattr(attention, "has_flash_attn", lambda: False)
    assert attention.resolve_attention("auto", packing=True, cuda=False) == attention.VARLEN
    assert attention.resolve_attention("auto", packing=False, cuda=False) == "sdpa"
    assert attention.resolve_attention("auto", packing=True, cuda=True) == attention.VARLEN
    assert attention.resolve_attention("auto", packing=False, cuda=True) == "sdpa"
    monkeypatch.setattr(attention, "torch_varlen_signature", lambda: None)  # torch < 2.9
    assert attention.resolve_attention("auto", packing=True, cuda=True) == "sdpa"
    monkeypatch.setattr(attention, "has_flash_attn", lambda: True)
    assert attention.resolve_attention("auto", packing=True, cuda=True) == "flash_attention_2"
    assert attention.resolve_attention("varlen", packing=True, cuda=True) == "flash_attention_2"
    assert attention.resolve_attention("auto", packing=False, cuda=True) == "flash_attention_2"
    assert attention.resolve_attention("auto", packing=True, cuda=False) == attention.VARLEN
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        attention.resolve_attention("flash_attention_2", cuda=False)
