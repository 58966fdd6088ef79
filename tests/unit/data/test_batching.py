"""Samples -> micro-batches: padding with the dummy image, packing equal to padding for every family, host positions,
FLOPs counted alike, attention kept inside samples."""

from __future__ import annotations

import pytest
import torch
from fixtures.encoding import packing_setup
from fixtures.numerics import assert_same, loss_and_grads

from ds_vlm.data.batching import Collator, SFTDataset
from ds_vlm.data.encode import IGNORE_INDEX, Encoder, count_targets
from ds_vlm.data.formats import to_sample
from ds_vlm.data.images import load_images
from ds_vlm.data.sources import RecordIndex
from ds_vlm.demo import FAMILIES
from ds_vlm.models import adapter_for
from ds_vlm.parallel.ulysses import SequenceParallel


def test_collator_pads_and_runs_the_vision_tower_for_text_only_batches(encoder, demo_dir):
    text = to_sample({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "A red circle."}]},
                     "t.jsonl", 0)
    image = RecordIndex([str(demo_dir / "data" / "train.jsonl")]).sample(0)
    e_text, e_image = encoder.encode(text, []), encoder.encode(image, load_images(image))
    collate = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())

    micro = collate([e_text, e_image])  # has an image: no dummy
    assert micro.inputs["pixel_values"].shape == e_image["pixel_values"].shape and "labels" not in micro.inputs
    assert (micro.bad, micro.samples, micro.tokens, micro.targets, micro.computed, micro.sample_lengths) == (
        [], 2, e_text["input_ids"].shape[1] + e_image["input_ids"].shape[1],
        count_targets(e_text["labels"]) + count_targets(e_image["labels"]), micro.inputs["input_ids"].numel(),
        [e_text["input_ids"].shape[1], e_image["input_ids"].shape[1]])
    assert (micro.labels[0, e_text["input_ids"].shape[1]:] == IGNORE_INDEX).all()

    micro = collate([e_text])  # text only: the dummy image rides along, ignored by the loss
    assert "pixel_values" in micro.inputs and micro.targets == count_targets(e_text["labels"])
    assert count_targets(micro.labels) == micro.targets
    micro = collate([])  # an empty slot at the end of an epoch still runs the towers
    assert micro.samples == micro.tokens == micro.targets == 0 and count_targets(micro.labels) == 0
    # the training dataset's samples carry their records' names, which an error in the step names
    path = demo_dir / "data" / "train.jsonl"
    dataset = SFTDataset(RecordIndex([str(path)]), encoder)
    micro = collate([dataset[3], dataset[0]])
    assert micro.records == [f"{path} record 3", f"{path} record 0"] and "record" not in micro.inputs


def test_dummy_image_does_not_change_the_loss(encoder, demo_dir):
    from transformers import AutoModelForImageTextToText

    from ds_vlm.train.loss import LabelLoss, LabelRows

    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model", dtype=torch.float32).eval()
    loss = LabelLoss(model)
    text = to_sample({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "A red circle."}]},
                     "t.jsonl", 0)
    plain = encoder.encode(text, [])
    padded = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())([plain])
    with torch.no_grad():
        inputs = {k: v for k, v in plain.items() if k != "labels"}
        a = loss.loss_of(model, inputs, LabelRows.from_labels(plain["labels"]))
        b = loss.loss_of(model, padded.inputs, LabelRows.from_labels(padded.labels))
    assert padded.inputs["input_ids"].shape[1] > plain["input_ids"].shape[1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)  # Qwen3.5's linear attention through linear_attention.py
def test_packed_equals_padded(family, family_models, packing_records):
    """Loss and every gradient, fp32: an image sample, a text-only one and a two-image one in one micro-batch;
    then two text-only samples, where the packed row carries the dummy image as its own sample. A family whose
    attention packing would not keep (Gemma 3) is refused at load, with the reason; its packed row does differ."""
    model, dataset, padded, packed = packing_setup(family_models(family), packing_records)
    samples = [dataset[i] for i in (0, 1, 2)]
    refusal = adapter_for(family).packing_refusal(model.config)
    if refusal:
        from ds_vlm.config import ConfigError, ModelConfig
        from ds_vlm.models.loading import load_model

        with pytest.raises(ConfigError, match=f"--packing: {family}: .*sliding-window"):
            load_model(ModelConfig(path=str(family_models(family))), {"zero_optimization": {}, "bf16": {}}, "sdpa",
                       packing=True)
        assert not torch.allclose(loss_and_grads(model, packed(samples))[0], loss_and_grads(model, padded(samples))[0])
        return
    reference, got = loss_and_grads(model, padded(samples)), loss_and_grads(model, packed(samples))
    assert_same(got, reference)
    micro = got[2]
    assert micro.computed == micro.tokens == sum(s["input_ids"].shape[1] for s in samples)  # no padding
    text_only = [dataset[1], dataset[1]]
    reference, got = loss_and_grads(model, padded(text_only)), loss_and_grads(model, packed(text_only))
    assert_same(got, reference)
    vision = adapter_for(family).parts(model).vision_blocks[0]
    assert any(p.grad is not None for p in vision.parameters())  # the vision tower ran (the dummy image)
    assert got[2].computed > got[2].tokens  # the dummy's tokens are computed, not counted


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batches_carry_host_positions_and_count_flops_as_packed(family, family_models, packing_records,
                                                                        monkeypatch):
    """A padded batch with the adapter's positions computed on the host (the collator's, for every Qwen family)
    gives the loss and gradients of the model computing them itself, and the forward never calls the model's
    rope index (on a GPU it reads token types back to the host row by row). The same samples padded and packed
    count the same model FLOPs (attention within each sample, the real tokens only)."""
    from ds_vlm.config import ModelConfig
    from ds_vlm.runtime.flops import FlopsCounter

    model, dataset, padded, packed = packing_setup(family_models(family), packing_records)
    adapter = adapter_for(family)
    samples = [dataset[i] for i in (0, 1, 2)]
    reference = loss_and_grads(model, padded(samples))
    if adapter.padded_batch_positions:  # as the trainer builds its collator (LLaVA: plain positions in the model)
        batch = Collator(padded.pad_token_id, padded.dummy, adapter.position_ids(model.config))(samples)
        assert batch.inputs["position_ids"].shape[:2] == (4, 3)  # the text row and mrope's 3, per padded row
        with monkeypatch.context() as patch:
            patch.setattr(type(model.model), "get_rope_index",
                          lambda *a, **k: pytest.fail("the rope index was computed in the forward"))
            assert_same(loss_and_grads(model, batch), reference)
    counter = FlopsCounter(model, adapter, ModelConfig())
    images = [dataset[0], dataset[2], dataset[3]]
    padded_row, packed_row = padded(images), packed(images)
    assert padded_row.targets == packed_row.targets > 0
    assert counter(padded_row.inputs, padded_row.targets, padded_row.sample_lengths) == counter(
        packed_row.inputs, packed_row.targets, packed_row.sample_lengths) > 0
    width = padded_row.inputs["input_ids"].shape[1]
    assert counter(padded_row.inputs, padded_row.targets, padded_row.sample_lengths) < counter(
        padded_row.inputs, padded_row.targets, [width] * 3)  # padding is not work


def _token_losses(model, micro, **forward_kwargs) -> torch.Tensor:
    """Cross-entropy of every position that predicts a label, in order, from the full logits."""
    with torch.no_grad():
        logits = model(**micro.inputs, **forward_kwargs).logits[0, :-1]
    targets = micro.labels[0, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="none")


def test_changing_one_sample_leaves_the_others_exactly_unchanged(demo_dir, packing_records):
    """Qwen3-VL, fp32: rows [A, B] and [A, B'] (B' = B with another image, same length): A's per-token losses
    are bit-identical, and B's are not (so the check sees a change where there is one). Negative controls:
    with 3-row position ids (no text row) or with a KV cache, the same swap changes A's losses when A comes
    after B: attention crossed into B."""
    model, dataset, _, packed = packing_setup(demo_dir / "model", packing_records)
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
        row.inputs["position_ids"] = row.inputs["position_ids"][1:]
    x, y = (_token_losses(model, row) for row in three_rows)
    assert not torch.equal(x[-n_a:], y[-n_a:]), "3-row position ids should let attention cross samples"
    assert leaks(use_cache=True), "a KV cache should let attention cross samples"
    assert not leaks()


def _group(size: int, rank: int) -> SequenceParallel:
    """A SequenceParallel seen from one rank, without a process group (for what needs none)."""
    sp = object.__new__(SequenceParallel)
    sp.size, sp.rank = size, rank
    return sp


def test_sequences_are_padded_to_split_evenly_or_refused(demo_dir, mixed_data):
    from transformers import AutoConfig, AutoProcessor

    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for

    processor = AutoProcessor.from_pretrained(demo_dir / "model")
    encoder = Encoder(processor, adapter_for("qwen3_vl"), 512)
    records = RecordIndex([str(mixed_data)])
    samples = [encoder.encode(records.sample(i), []) for i in (1, 3)]  # text-only
    lengths = [int(s["input_ids"].shape[1]) for s in samples]
    rope = adapter_for("qwen3_vl").position_ids(AutoConfig.from_pretrained(demo_dir / "model"))
    for positions in (None, rope):  # padded rows, then one packed row
        micro = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), positions, multiple_of=3,
                         packing=positions is not None)(samples)
        width = micro.inputs["input_ids"].shape[1]
        assert width % 3 == 0 and micro.tokens == sum(lengths)
        assert count_targets(micro.labels) == micro.targets  # the padding has no label
        if positions is not None:
            assert micro.inputs["position_ids"].shape[-1] == width == int(micro.cu_seq_lens[-1])
    with pytest.raises(ValueError, match="does not split over --sequence_parallel 2"):
        _group(2, 0).bounds(7)


def test_pixels_leave_the_worker_in_the_model_dtype(encoder, demo_dir):
    """A bf16 run's collator casts the pixels as the forward would (the same values), halving what workers x prefetch
    hold in /dev/shm; everything else keeps its dtype."""
    dummy = encoder.dummy()
    fp32 = Collator(encoder.tokenizer.pad_token_id, dummy)([dict(dummy)])
    bf16 = Collator(encoder.tokenizer.pad_token_id, dummy, pixel_dtype=torch.bfloat16)([dict(dummy)])
    assert fp32.inputs["pixel_values"].dtype == torch.float32 and bf16.inputs["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(bf16.inputs["pixel_values"], fp32.inputs["pixel_values"].to(torch.bfloat16))
    assert all(bf16.inputs[k].dtype == v.dtype for k, v in fp32.inputs.items() if k != "pixel_values")


def test_loader_workers_are_fitted_to_dev_shm():
    """workers x prefetch x the largest micro-batch must fit half of /dev/shm's free space (a full one kills a worker
    with a bus error mid-run): fewer batches in flight first, then fewer workers, said; room to spare: unchanged."""
    from ds_vlm.data.batching import fit_to_shm

    gb = 1e9
    assert fit_to_shm(8, 2, 0.5 * gb, 64 * gb) == (8, 2, "")
    workers, prefetch, said = fit_to_shm(8, 2, 1.5 * gb, 32 * gb)  # room for 10 batches: 8 x 1
    assert (workers, prefetch) == (8, 1) and "8 loader workers x 1 batches in flight (was 8 x 2)" in said
    workers, prefetch, said = fit_to_shm(8, 2, 1 * gb, 8 * gb)  # room for 4: 4 workers x 1
    assert (workers, prefetch) == (4, 1) and "--shm-size" in said
    assert fit_to_shm(8, 2, 1 * gb, 0.064 * gb)[:2] == (0, 2)  # docker's 64 MB: the main process loads
    assert fit_to_shm(0, 2, 10 * gb, 0)[:2] == (0, 2)
