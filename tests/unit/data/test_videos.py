"""Videos: frames sampled and timestamped, the peers' layouts alike, packed equal to padded, bad videos named."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from fixtures.datasets import absolute_rows, write_jsonl
from fixtures.encoding import check, video_encoder
from fixtures.numerics import assert_same, loss_and_grads

from ds_vlm.data.batching import Collator, SFTDataset
from ds_vlm.data.sources import RecordIndex
from ds_vlm.data.videos import VideoSampling

VIDEO_FAMILIES = ["qwen3_vl", "qwen2_5_vl", "qwen2_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]


@pytest.fixture(scope="module")
def mixed(demo_dir, clips, tmp_path_factory) -> Path:
    """A video record, an image record, a text-only one, a second video: what one micro-batch may hold."""
    video, image = absolute_rows(clips / "video_train.jsonl", clips), absolute_rows(demo_dir / "data" / "train.jsonl",
                                                                     demo_dir / "data")
    text = {"conversations": [{"from": "human", "value": "Say a caption."}, image[1]["conversations"][1]]}
    return write_jsonl(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", [video[0], image[0], text, video[1]])


def test_frames_are_sampled_by_fps_and_capped_and_timestamped(demo_dir, clips):
    """Qwen3-VL: a 2 s clip at --video_fps 2 is 4 frames (2 groups of 2), at 4 fps 8 frames (4 groups), capped
    to 4 by --video_max_frames; each group gets its `<t seconds>` and its frames' tokens; the list-of-frames form
    reads the same clip's frames as images."""
    records = RecordIndex([str(clips / "video_train.jsonl")])
    sample = records.sample(0)

    def encoded(sampling: VideoSampling):
        encoder = video_encoder(demo_dir / "model", "qwen3_vl", sampling)
        out = encoder.encode(sample, *encoder.media(sample))
        text = encoder.tokenizer.decode(out["input_ids"][0])
        return out, text, encoder

    for sampling, groups in ((VideoSampling(2.0, 32), 2), (VideoSampling(4.0, 32), 4), (VideoSampling(4.0, 4), 2)):
        out, text, encoder = encoded(sampling)
        t, h, w = out["video_grid_thw"][0].tolist()
        merge = encoder.processor.video_processor.merge_size
        video_id = encoder.tokenizer.convert_tokens_to_ids(encoder.video_token)
        assert t == groups and text.count(" seconds>") == groups, (sampling, text)
        assert int((out["input_ids"] == video_id).sum()) == t * h * w // merge ** 2
        assert out["pixel_values_videos"].shape[0] == t * h * w and (out["labels"][0] != -100).any()
        assert "moving" in encoder.tokenizer.decode(out["input_ids"][0][out["labels"][0] != -100])


def test_peer_video_layouts_give_the_same_tensors(demo_dir, clips, tmp_path):
    """LLaMA-Factory's `videos` + `<video>`, Qwen's `video` key, OpenAI-style parts, and the clip as a list of frame
    files (Qwen's form), all the same clip: the same token ids; the frame files also the same pixels."""
    import av
    from PIL import Image

    row = absolute_rows(clips / "video_train.jsonl", clips)[0]
    path, question, answer = row["videos"][0], row["conversations"][0]["value"], row["conversations"][1]["value"]
    frames = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            frames.append(str(tmp_path / f"frame_{i}.png"))
            frame.to_image().save(frames[-1])
    layouts = [
        row,
        {"video": path, "conversations": row["conversations"]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": path},
                                                   {"type": "text", "text": question.replace("<video>", "")}]},
                      {"role": "assistant", "content": [{"type": "text", "text": answer}]}]},
    ]
    data = write_jsonl(tmp_path / "layouts.jsonl", layouts + [{**row, "videos": [frames]}])
    encoder = video_encoder(demo_dir / "model", "qwen3_vl", VideoSampling(4.0, 32))  # every frame of the 4 fps clip
    dataset = SFTDataset(RecordIndex([str(data)]), encoder)
    items = [dataset[i] for i in range(4)]
    for item in items[1:]:
        assert torch.equal(item["input_ids"], items[0]["input_ids"]) and torch.equal(item["labels"], items[0]["labels"])
    for item in items[1:3]:
        assert torch.equal(item["pixel_values_videos"], items[0]["pixel_values_videos"])
    assert items[3]["video_grid_thw"].tolist() == items[0]["video_grid_thw"].tolist()
    assert len(frames) == 8 and Image.open(frames[0]).size == (64, 64)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_packed_equals_padded_and_text_only_batches_run_the_video_path(family, family_models, mixed):
    """fp32 loss and every gradient: [video, image, text-only, video] padded vs packed (each sample's own rope
    positions, Qwen2.5-VL's seconds per grid included; where a family refuses packing: padded vs each sample
    alone); then two text-only samples: the dummy image and the dummy video leave the loss as it is and put
    gradients on the vision tower."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.models.base import set_use_cache

    model_dir = family_models(family)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    set_use_cache(model.config, False)
    model.train()
    encoder = video_encoder(model_dir, family)
    dataset = SFTDataset(RecordIndex([str(mixed)]), encoder)
    samples = [dataset[i] for i in range(4)]
    assert "pixel_values_videos" in samples[0] and "pixel_values" in samples[1] and "pixel_values" not in samples[2]
    pad_id, dummy, dummy_video = encoder.tokenizer.pad_token_id, encoder.dummy(), encoder.dummy_video()
    padded = Collator(pad_id, dummy, dummy_video=dummy_video)
    packed = Collator(pad_id, dummy, encoder.adapter.position_ids(model.config), dummy_video=dummy_video,
                      packing=True)
    if not encoder.adapter.packing_refusal(model.config):
        reference, got = loss_and_grads(model, padded(samples)), loss_and_grads(model, packed(samples))
        assert_same(got, reference)
        assert got[2].computed == got[2].tokens  # video and image present: nothing added
    else:
        packed = None
        alone = sum(loss_and_grads(model, padded([sample]))[0] for sample in samples)
        torch.testing.assert_close(loss_and_grads(model, padded(samples))[0], alone, rtol=1e-5, atol=0)

    text_only = [samples[2], samples[2]]
    calls = []
    vision = encoder.adapter.parts(model).vision_blocks[0]
    hook = vision.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    without_video = loss_and_grads(model, Collator(pad_id, dummy)(text_only))
    assert len(calls) == 1  # the dummy image only
    for collator in (padded, packed) if packed else (padded,):
        calls.clear()
        micro = collator(text_only)
        assert "pixel_values_videos" in micro.inputs and "pixel_values" in micro.inputs
        loss, grads, _ = loss_and_grads(model, micro)
        torch.testing.assert_close(loss, without_video[0], rtol=1e-5, atol=0)
        assert len(calls) == 2 and any(p.grad is not None for p in vision.parameters())  # image, then video
    hook.remove()


def test_bad_videos_are_named_and_llava_refuses_video(demo_dir, clips, family_models, tmp_path):
    """A missing file, a corrupt one, one with no frames, a missing frame file: each a DataError of its kind naming
    the file and record; a sample with video is never truncated; LLaVA has no video path and says so."""
    import av

    good = absolute_rows(clips / "video_train.jsonl", clips)[0]
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(random.Random(0).randrange(256) for _ in range(4000)))
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as container:  # a header, no frame
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    rows = [good] + [{**good, "videos": [v]} for v in (str(tmp_path / "nowhere.mp4"), str(corrupt), str(empty),
                                                       [str(tmp_path / "f0.png"), str(tmp_path / "f1.png")])]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    checks = check(RecordIndex([str(data)]), video_encoder(demo_dir / "model", "qwen3_vl"))
    assert [c.kind for c in checks] == ["ok", "missing_video", "unreadable_video", "unreadable_video",
                                        "missing_video"], [c.message for c in checks]
    for one, name in zip(checks[1:], ("nowhere.mp4", "corrupt.mp4", "empty.mp4", "f0.png")):
        assert f"{data} record {one.index}" in one.message and name in one.message, one.message
    assert "has no frames" in checks[3].message
    assert checks[0].n_video_tokens > 0 and checks[0].n_tokens > checks[0].n_video_tokens

    short = check(RecordIndex([str(data)]), video_encoder(demo_dir / "model", "qwen3_vl", max_length=20,
                                                     truncation="truncate"), [0])
    assert short[0].kind == "too_long" and "never truncated" in short[0].message

    llava = check(RecordIndex([str(data)]), video_encoder(family_models("llava"), "llava"), [0])
    assert llava[0].kind == "unsupported_media" and "llava" in llava[0].message and "record 0" in llava[0].message
