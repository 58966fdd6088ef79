"""Samples -> token ids, labels and vision tensors: the label mask, pixel bounds, over-long samples, truncation."""

from __future__ import annotations

import pytest
import torch

from ds_vlm.data.encode import IGNORE_INDEX, Encoder, set_pixel_bounds
from ds_vlm.data.formats import DataError, to_sample
from ds_vlm.data.images import load_images
from ds_vlm.data.sources import RecordIndex
from ds_vlm.models import adapter_for


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
    between = "\n<|im_start|>user\nAnd the colour?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids[spans[0][1]:spans[1][0]]) == between
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (ids == image_id).sum() == out["image_grid_thw"].prod() // 4
    # the tokens equal what the processor gives for the whole conversation at once
    whole = encoder.processor(text=[encoder.render(sample.messages)], images=load_images(sample), return_tensors="pt")
    assert torch.equal(whole["input_ids"][0], ids)
    assert torch.equal(whole["pixel_values"], out["pixel_values"])


def test_too_long_is_named(encoder, demo_dir):
    short = Encoder(encoder.processor, encoder.adapter, max_length=20)
    sample = RecordIndex([str(demo_dir / "data" / "train.jsonl")]).sample(3)
    with pytest.raises(DataError, match=r"train.jsonl record 3: too_long: \d+ tokens"):
        short.encode(sample, load_images(sample))


@pytest.fixture(scope="module")
def processor(demo_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(demo_dir / "model")


def test_max_pixels_and_min_pixels_change_the_image_tokens(processor, demo_dir):
    import copy

    sample = RecordIndex(str(demo_dir / "data" / "train.jsonl")).sample(0)
    image_tokens = {}
    for bounds in ((0, 0), (0, 32 * 32), (128 * 128, 256 * 256)):
        p = copy.deepcopy(processor)
        set_pixel_bounds(p, *bounds)
        encoded = Encoder(p, adapter_for("qwen3_vl"), 512).encode(sample, load_images(sample))
        image_tokens[bounds] = int(encoded["image_grid_thw"].prod() // 4)
    assert image_tokens == {(0, 0): 16, (0, 32 * 32): 4, (128 * 128, 256 * 256): 64}
    with pytest.raises(ValueError, match="> --max_pixels"):
        set_pixel_bounds(copy.deepcopy(processor), 4096, 1024)


def test_truncation_never_cuts_an_image_and_keeps_an_answer(processor, demo_dir):
    adapter = adapter_for("qwen3_vl")
    image = str(demo_dir / "data" / "images" / "train_00000.png")
    record = {"conversations": [{"from": "human", "value": "Look: <image> and <image> now"},
                                {"from": "gpt", "value": "A red circle. " * 8}], "images": [image, image]}
    sample = to_sample(record, "t.jsonl", 7)
    full = Encoder(processor, adapter, 1024).encode(sample, load_images(sample))
    ids = full["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    second_image_start = [i for i in range(1, len(ids)) if ids[i] == image_id and ids[i - 1] != image_id][1]
    # a cut inside the second image: everything from its <|vision_start|> goes, with its pixels
    cut_inside = second_image_start + 5
    record2 = {**record, "conversations": [record["conversations"][0], {"from": "gpt", "value": "A red circle."}]}
    with pytest.raises(DataError, match="no answer token"):
        Encoder(processor, adapter, cut_inside, "truncate").encode(sample, load_images(sample))
    # the answer of a two-turn record survives a cut inside the second image
    two_turn = to_sample({"conversations": [{"from": "human", "value": "<image>What?"},
                                            {"from": "gpt", "value": "A red circle."},
                                            {"from": "human", "value": "And this <image>?"},
                                            {"from": "gpt", "value": "A red circle too."}],
                          "images": [image, image]}, "t.jsonl", 8)
    whole = Encoder(processor, adapter, 1024).encode(two_turn, load_images(two_turn))
    wids = whole["input_ids"][0]
    starts = [i for i in range(1, len(wids)) if wids[i] == image_id and wids[i - 1] != image_id]
    cut = Encoder(processor, adapter, starts[1] + 3, "truncate").encode(two_turn, load_images(two_turn))
    assert cut["input_ids"].shape[1] == starts[1] - 1  # before <|vision_start|> of image 2
    assert cut["image_grid_thw"].shape[0] == 1
    assert cut["pixel_values"].shape[0] == int(whole["image_grid_thw"][0].prod())
    assert (cut["input_ids"] == image_id).sum() == 16
    learned = cut["input_ids"][0][cut["labels"][0] != IGNORE_INDEX]
    assert processor.tokenizer.decode(learned) == "A red circle.<|im_end|>"
    with pytest.raises(DataError, match="too_long"):
        Encoder(processor, adapter, 20, "error").encode(to_sample(record2, "t.jsonl", 9), load_images(sample))
