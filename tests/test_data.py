"""Records -> samples -> token ids/labels -> batches, on the tiny model's real processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ds_vlm.data.batching import BatchPlan, Collator, count_targets
from ds_vlm.data.encode import IGNORE_INDEX, Encoder
from ds_vlm.data.formats import DataError, to_sample
from ds_vlm.data.images import load_images
from ds_vlm.data.preflight import check_records
from ds_vlm.data.sources import RecordFile, RecordIndex
from ds_vlm.models import adapter_for


@pytest.fixture(scope="module")
def encoder(demo_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_dir / "model")
    return Encoder(processor, adapter_for("qwen3_vl"), max_length=256)


def _spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    mask = (labels != IGNORE_INDEX).tolist()
    spans, start = [], None
    for i, on in enumerate(mask + [False]):
        if on and start is None:
            start = i
        if not on and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_label_mask_two_turns(encoder, demo_dir):
    record = {"conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>What is in this picture?"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "And the colour?"},
        {"from": "gpt", "value": "red"},
    ], "images": ["images/train_00000.png"]}
    sample = to_sample(record, str(demo_dir / "data" / "x.jsonl"), 0)
    out = encoder.encode(sample, load_images(sample))
    ids, labels = out["input_ids"][0], out["labels"][0]
    tok = encoder.tokenizer
    spans = _spans(labels)
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["A red circle.<|im_end|>", "red<|im_end|>"]
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    # everything outside the answers -- system, user turns, role headers, image tokens -- is ignored
    text_before = tok.decode(ids[:spans[0][0]])
    assert text_before.endswith("<|im_start|>assistant\n") and "Answer briefly." in text_before
    assert tok.decode(ids[spans[0][1]:spans[1][0]]) == "\n<|im_start|>user\nAnd the colour?<|im_end|>\n<|im_start|>assistant\n"
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (ids == image_id).sum() == out["image_grid_thw"].prod() // 4
    # the tokens equal what the processor gives for the whole conversation at once
    whole = encoder.processor(text=[encoder.render(sample.messages)], images=load_images(sample), return_tensors="pt")
    assert torch.equal(whole["input_ids"][0], ids)
    assert torch.equal(whole["pixel_values"], out["pixel_values"])


def test_jsonl_and_parquet_give_the_same_tensors(encoder, demo_dir):
    data = demo_dir / "data"
    for i in (0, 5):
        a = RecordIndex([str(data / "train.jsonl")]).sample(i)
        b = RecordIndex([str(data / "train.parquet")]).sample(i)
        ea, eb = encoder.encode(a, load_images(a)), encoder.encode(b, load_images(b))
        assert ea.keys() == eb.keys()
        for key in ea:
            assert torch.equal(ea[key], eb[key]), key


def _write_bad_set(tmp: Path, demo_dir: Path) -> Path:
    good = json.loads((demo_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    image = str(demo_dir / "data" / good["images"][0])
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    records = [
        {**good, "images": [image], "id": "r0"},                       # 0 ok (an id nothing reads)
        {**good, "images": [str(tmp / "nope.png")]},                   # 1 missing image
        {**good, "images": [str(tmp / "broken.png")]},                 # 2 unreadable image
        {**good, "images": [image, image]},                            # 3 one <image>, two images
        {"conversations": good["conversations"][:1], "images": [image]},  # 4 no assistant turn
        {**good, "images": [image]},                                   # 5 ok
    ]
    path = tmp / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_preflight_names_file_record_and_defect(encoder, demo_dir, tmp_path):
    path = _write_bad_set(tmp_path, demo_dir)
    checks = check_records(RecordIndex([str(path)]), encoder)
    assert [c.kind for c in checks] == ["ok", "missing_image", "unreadable_image", "placeholder_mismatch",
                                        "no_assistant_turn", "ok"]
    for c in checks[1:5]:
        assert f"{path} record {c.index}: {c.kind}" in c.message
    assert "nope.png" in checks[1].message and "broken.png" in checks[2].message
    assert "1 <image> placeholder(s) but 2 image(s)" in checks[3].message


def test_too_long_is_named(encoder, demo_dir):
    short = Encoder(encoder.processor, encoder.adapter, max_length=20)
    sample = RecordIndex([str(demo_dir / "data" / "train.jsonl")]).sample(3)
    with pytest.raises(DataError, match=r"train.jsonl record 3: too_long: \d+ tokens"):
        short.encode(sample, load_images(sample))


def test_collator_pads_and_runs_the_vision_tower_for_text_only_batches(encoder, demo_dir):
    text = to_sample({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "A red circle."}]},
                     "t.jsonl", 0)
    image = RecordIndex([str(demo_dir / "data" / "train.jsonl")]).sample(0)
    e_text, e_image = encoder.encode(text, []), encoder.encode(image, load_images(image))
    collate = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())

    batch, meta = collate([e_text, e_image])  # has an image: no dummy
    assert batch["pixel_values"].shape == e_image["pixel_values"].shape
    assert meta == {"bad": [], "samples": 2, "tokens": e_text["input_ids"].shape[1] + e_image["input_ids"].shape[1],
                    "targets": count_targets(e_text["labels"]) + count_targets(e_image["labels"]),
                    "computed": batch["input_ids"].numel(),
                    "sample_lengths": [e_text["input_ids"].shape[1], e_image["input_ids"].shape[1]]}
    assert (batch["labels"][0, e_text["input_ids"].shape[1]:] == IGNORE_INDEX).all()

    batch, meta = collate([e_text])  # text only: the dummy image rides along, ignored by the loss
    assert "pixel_values" in batch and meta["targets"] == count_targets(e_text["labels"])
    assert count_targets(batch["labels"]) == meta["targets"]
    batch, meta = collate([])  # an empty slot at the end of an epoch still runs the towers
    assert meta["samples"] == meta["tokens"] == meta["targets"] == 0 and count_targets(batch["labels"]) == 0


def test_dummy_image_does_not_change_the_loss(encoder, demo_dir):
    from transformers import AutoModelForImageTextToText

    from ds_vlm.loss import LabelLoss, LabelRows

    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model", dtype=torch.float32).eval()
    loss = LabelLoss(model)

    def loss_sum(batch):
        batch = dict(batch)
        return loss(model, batch, LabelRows.from_labels(batch.pop("labels")))

    text = to_sample({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "A red circle."}]},
                     "t.jsonl", 0)
    plain = encoder.encode(text, [])
    padded, _ = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())([plain])
    with torch.no_grad():
        a, b = loss_sum(plain), loss_sum(padded)
    assert padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,mb,ga,world", [(10, 1, 1, 2), (37, 2, 3, 2), (8, 4, 1, 1), (9, 1, 2, 4)])
def test_batch_plan_covers_each_sample_once_per_epoch(n, mb, ga, world):
    plan = BatchPlan(n, mb, ga, world, seed=3)
    for epoch in range(2):
        seen = []
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            per_rank = [plan.micro_batches(step, r) for r in range(world)]
            assert all(len(m) == ga for m in per_rank)
            step_samples = [i for m in per_rank for mb_ in m for i in mb_]
            assert sorted(step_samples) == sorted(plan.step_samples(step))
            seen += step_samples
        assert sorted(seen) == list(range(n))
    # the same global batches whatever the world size (what resuming on another size relies on)
    other = BatchPlan(n, mb * world, ga, 1, seed=3)
    assert [sorted(plan.step_samples(s)) for s in range(5)] == [sorted(other.step_samples(s)) for s in range(5)]


def test_record_file_reports_bad_json(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"conversations": []}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl record 1: bad_record: not valid JSON"):
        RecordFile(str(path))[1]


def test_every_layout_becomes_the_same_sample(demo_dir, tmp_path):
    image = demo_dir / "data" / "images" / "train_00000.png"
    raw = image.read_bytes()
    answer = "A red circle."
    layouts = {
        "sharegpt": {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": answer}],
                     "images": ["images/train_00000.png"]},
        "messages": {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": answer}],
                     "images": [str(image)]},
        "llava": {"image": "images/train_00000.png",
                  "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": answer}]},
        "openai": {"messages": [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                             {"type": "text", "text": "What?"}]},
                                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]},
        "bytes": {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": answer}],
                  "images": [{"bytes": raw, "path": None}]},
    }
    source = str(demo_dir / "data" / "any.jsonl")
    for name, record in layouts.items():
        sample = to_sample(record, source, 0)
        assert [m["role"] for m in sample.messages] == ["user", "assistant"], name
        assert sample.messages[0]["content"][0] == {"type": "image"}, name
        assert sample.messages[1]["content"] == [{"type": "text", "text": answer}], name
        (img,) = load_images(sample)
        assert img.size == (64, 64), name
