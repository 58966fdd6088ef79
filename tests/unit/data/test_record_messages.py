"""What a record says is read, or refused naming the file, the record and the real cause: assistant-first
conversations, image/images conflicts, empty system prompts, symlinks, Windows separators, OpenAI's `name` and
nested part keys, SVG; and the options a record gives are honoured: `weight: 0`, per-image pixel bounds, a
video's own fps and start/end."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from ds_vlm.data.encode import IGNORE_INDEX, Encoder
from ds_vlm.data.formats import ASSISTANT_FIRST, DataError, to_sample
from ds_vlm.data.formats_media import WINDOWS_SEPARATORS
from ds_vlm.data.images import load_images
from ds_vlm.data.sample import Sample, VideoRef
from ds_vlm.data.videos import VideoSampling, load_video
from ds_vlm.models import adapter_for


def png(size=(64, 64)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def encoder(demo_dir):
    from transformers import AutoProcessor

    return Encoder(AutoProcessor.from_pretrained(demo_dir / "model"), adapter_for("qwen3_vl"), 512)


def learned_and_ids(encoder, sample) -> tuple[str, list]:
    out = encoder.encode(sample, load_images(sample))
    ids, labels = out["input_ids"][0], out["labels"][0]
    return encoder.tokenizer.decode(ids[labels != IGNORE_INDEX]), ids.tolist()


def chat(*turns, **extra) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns], **extra}


def test_an_assistant_first_conversation_reads_with_the_greeting_as_context(encoder, tmp_path):
    record = chat(("assistant", "Hello! Ask me."), ("user", "Colour of grass?"), ("assistant", "Green."))
    sample = to_sample(record, str(tmp_path / "a.jsonl"), 3)
    assert [m["learn"] for m in sample.messages] == [False, False, True] and sample.notes == [ASSISTANT_FIRST]
    learned, _ = learned_and_ids(encoder, sample)
    assert "Green." in learned and "Hello" not in learned
    with pytest.raises(DataError, match=r"a.jsonl record 3: no_assistant_turn: .*its only assistant turn opens the "
                                        r"conversation"):
        to_sample(chat(("assistant", "Hello!")), str(tmp_path / "a.jsonl"), 3)


def test_weight_zero_is_an_unlearned_turn(encoder, tmp_path):
    record = {"messages": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "Uno.", "weight": 0},
                           {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Dos.",
                                                                  "weight": 1}]}
    sample = to_sample(record, "w.jsonl", 0)
    assert [m["learn"] for m in sample.messages if m["role"] == "assistant"] == [False, True] and not sample.ignored
    learned, _ = learned_and_ids(encoder, sample)
    assert "Dos." in learned and "Uno" not in learned
    with pytest.raises(DataError, match="every one has 'loss': false or 'weight': 0"):
        to_sample({"messages": record["messages"][:2]}, "w.jsonl", 0)
    half = {"messages": [record["messages"][0], {**record["messages"][1], "weight": 0.5}]}
    assert to_sample(half, "w.jsonl", 0).ignored == ("turn.weight",)  # not honoured, so reported


def test_image_and_images_given_together(tmp_path):
    (tmp_path / "x.png").write_bytes(png())
    base = {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "Red."}]}
    sample = to_sample({**base, "image": "x.png", "images": None}, str(tmp_path / "d.jsonl"), 4)
    assert sample.images[0].path == str(tmp_path / "x.png") and sample.notes == ["'images' is None: the 'image' "
                                                                                  "field read"]
    with pytest.raises(DataError, match=r"d.jsonl record 4: bad_record: both 'images' and 'image' hold media"):
        to_sample({**base, "image": "x.png", "images": ["y.png"]}, str(tmp_path / "d.jsonl"), 4)


def test_an_empty_system_string_is_no_system_prompt():
    sample = to_sample({**chat(("user", "Hi"), ("assistant", "Hello.")), "system": ""}, "s.jsonl", 0)
    assert [m["role"] for m in sample.messages] == ["user", "assistant"]
    turn = to_sample(chat(("system", " "), ("user", "Hi"), ("assistant", "Hello.")), "s.jsonl", 0)
    assert [m["role"] for m in turn.messages] == ["user", "assistant"]
    with pytest.raises(DataError, match="the 'system' field is not text"):
        to_sample({**chat(("user", "Hi"), ("assistant", "Hello.")), "system": 3}, "s.jsonl", 0)


def test_symlink_targets_windows_separators_and_svg_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "3.png").write_bytes(png())
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "gone" / "1.png", tmp_path / "images" / "link.png")
    base = {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "Red."}]}
    source = str(tmp_path / "data" / "d.jsonl")
    sample = to_sample({**base, "images": ["..\\images\\3.png"]}, source, 0)
    assert sample.images[0].path == str(tmp_path / "images" / "3.png") and sample.notes == [WINDOWS_SEPARATORS]
    assert load_images(sample)[0].size == (64, 64)
    with pytest.raises(DataError, match=r"record 0: bad_record: image 'C:\\\\data\\\\3.png' is a Windows absolute"):
        to_sample({**base, "images": ["C:\\data\\3.png"]}, source, 0)
    linked = to_sample({**base, "images": ["../images/link.png"]}, source, 1)
    with pytest.raises(DataError, match=rf"record 1: missing_image: image file .*link.png is a symlink to "
                                        rf"{tmp_path / 'gone' / '1.png'}, which does not exist"):
        load_images(linked)
    (tmp_path / "images" / "v.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (tmp_path / "images" / "v.png").write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>')
    for name in ("v.svg", "v.png"):
        svg = to_sample({**base, "images": [f"../images/{name}"]}, source, 2)
        with pytest.raises(DataError, match=rf"record 2: unsupported_media: image .*{name} is an SVG, a vector format"):
            load_images(svg)


def test_openai_names_and_nested_part_keys_are_reported():
    record = {"messages": [
        {"role": "user", "name": "alice", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
            {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."}]}
    assert to_sample(record, "n.jsonl", 0).ignored == ("part.image_url.detail", "turn.name")


def test_per_image_pixel_bounds_and_size_are_honoured(encoder, tmp_path):
    (tmp_path / "a.png").write_bytes(png((64, 64)))
    (tmp_path / "small.png").write_bytes(png((16, 16)))

    def image_tokens(name="a.png", **options) -> int:
        record = {"messages": [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / name),
                                                             **options}, {"type": "text", "text": "What?"}]},
                               {"role": "assistant", "content": "Red."}]}
        sample = to_sample(record, str(tmp_path / "b.jsonl"), 0)
        return learned_and_ids(encoder, sample)[1].count(encoder.image_token_id)

    assert image_tokens() == 16  # 64x64, the processor's own bounds
    assert image_tokens(max_pixels=1024) == 4  # 32x32
    assert image_tokens("small.png") == 4  # 16x16 brought up to the processor's smallest area, 32x32
    assert image_tokens("small.png", min_pixels=64 * 64) == 16  # 64x64 (the processor's own bounds still apply)
    assert image_tokens(resized_height=32, resized_width=64) == 8
    with pytest.raises(DataError, match=r"'max_pixels' must be a number > 0, not -1"):
        image_tokens(max_pixels=-1)


def test_a_videos_own_fps_and_start_and_end_are_honoured(clips):
    row = json.loads((clips / "video_train.jsonl").read_text().splitlines()[0])
    path = str(clips / row["videos"][0])  # 8 frames at 4 fps: 2 s
    sample = Sample(messages=[], source="v.jsonl", index=0)
    sampling = VideoSampling(2.0, 32)

    def picked(**options) -> list[int]:
        return load_video(VideoRef(path=path, **options), sample, sampling)[1].frames_indices.tolist()

    assert picked() == [0, 2, 5, 7]  # --video_fps 2 over 2 s
    assert len(picked(fps=4.0)) == 8
    window = picked(start=1.0)
    assert min(window) >= 4 and len(window) == 2
    assert max(picked(end=1.0)) <= 4
    with pytest.raises(DataError, match=r"v.jsonl record 0: unreadable_video: .*video_start 5.0 s / video_end None s "
                                        r"leave no frame of its 2.0 s"):
        picked(start=5.0)
    parts = {"messages": [{"role": "user", "content": [{"type": "video", "video": path, "video_start": 1.0,
                                                        "video_end": 2.0, "fps": 4}]},
                          {"role": "assistant", "content": "x"}]}
    ref = to_sample(parts, "v.jsonl", 0).videos[0]
    assert (ref.start, ref.end, ref.fps) == (1.0, 2.0, 4.0)
    assert np.all(np.array(load_video(ref, sample, sampling)[1].frames_indices) >= 4)
