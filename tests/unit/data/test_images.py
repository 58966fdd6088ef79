"""Images decoded as viewers and transformers' `load_image` show them, each mode against a stated reference;
no record can stop preflight (the processor's, tokenizer's and reader's exceptions become named bad records)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.encoding import check
from PIL import Image, ImageOps

from ds_vlm.data.formats import ImageRef, Sample
from ds_vlm.data.images import ANIMATED, load_image
from ds_vlm.data.preflight import summarize
from ds_vlm.data.sources import RecordIndex


def _load(path) -> Image.Image:
    return load_image(ImageRef(path=str(path)), Sample(messages=[], source="x.jsonl", index=0))


def _asymmetric(width=48, height=24) -> np.ndarray:
    """Red left third, green top-right, blue bottom-right: any rotation or flip changes it."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 3] = (255, 0, 0)
    a[: height // 2, width // 3:] = (0, 255, 0)
    a[height // 2:, width // 3:] = (0, 0, 255)
    return a


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_as_exif_transpose_does(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_asymmetric()).save(path, exif=exif)
    with Image.open(path) as raw:
        reference = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
        stored = np.asarray(raw.convert("RGB"))
    got = np.asarray(_load(path))
    assert np.array_equal(got, reference)
    assert not np.array_equal(got.shape, stored.shape) or not np.array_equal(got, stored)  # really turned
    if orientation in (6, 8):
        assert got.shape[:2] == (48, 24)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 32).astype(np.uint16).reshape(32, 64)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
        clipped = np.asarray(raw.convert("RGB"))
    got = np.asarray(_load(path)).astype(int)
    assert got.shape == (32, 64, 3) and (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0] - (values >> 8)).max() <= 1
    assert abs(got.mean() - 127.5) < 2 and clipped.mean() > 250  # PIL's own convert: nearly white


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (0, 0, 0)         # black hidden under...
    rgba[:8, :, 3] = 0                # ...alpha 0 on the top half
    rgba[8:, :, 3] = 128              # half transparent black below
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    got = np.asarray(_load(path)).astype(int)
    assert (got[:8] == 255).all()
    assert np.abs(got[8:] - 127).max() <= 1

    grey = Image.fromarray(np.full((8, 8), 40, np.uint8), "L")  # a palette GIF with a transparent colour
    grey.putpixel((0, 0), 0)
    gif = tmp_path / "t.gif"
    grey.save(gif, transparency=0)
    got = np.asarray(_load(gif))
    assert (got[0, 0] == 255).all() and (got[1, 1] == 40).all()


def test_an_animated_file_is_its_first_frame_and_preflight_counts_it(demo_dir, tmp_path):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    sample = Sample(messages=[], source="x.jsonl", index=0)
    got = np.asarray(load_image(ImageRef(path=str(path)), sample)).astype(int)
    assert np.abs(got - (200, 0, 0)).max() <= 8 and sample.notes == [ANIMATED]


def test_no_record_stops_preflight(encoder, demo_dir, tmp_path):
    """A processor that refuses an image, a tokenizer that refuses a string, a reader that meets a shape it
    did not expect: each a bad record with file, record and reason; a trailing user turn and an animated
    image are counted notes of good records."""
    good = json.loads((demo_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    image = str(demo_dir / "data" / good["images"][0])
    Image.new("RGB", (2000, 8), (9, 9, 9)).save(tmp_path / "thin.png")
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    user, answer = good["conversations"]
    records = [
        {**good, "images": [str(tmp_path / "thin.png")]},                                  # 0 processor refuses
        {**good, "images": [image], "conversations": [user, {**answer, "value": "x\ud800"}]},  # 1 lone surrogate
        {**good, "images": [image], "conversations": [user, answer, {"from": "human", "value": "<image>more?"}]},
        {**good, "images": [str(tmp_path / "anim.gif")]},                                  # 3 animated
        {**good, "images": [image], "conversations": [user, {**answer, "value": {"text": "nested"}}]},  # 4
        {**good, "images": [image]},                                                       # 5 ok
    ]
    records[2]["images"] = [image, image]  # the trailing turn's image goes with it
    path = tmp_path / "edge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    checks = check(RecordIndex([str(path)]), encoder)
    kinds = [c.kind for c in checks]
    assert kinds == ["bad_record", "bad_record", "ok", "ok", "bad_record", "ok"], [c.message for c in checks]
    assert f"{path} record 0: bad_record: ValueError while encoding it" in checks[0].message
    assert "aspect ratio" in checks[0].message
    assert f"{path} record 1: bad_record:" in checks[1].message and "\n" not in checks[1].message
    assert f"{path} record 4: bad_record:" in checks[4].message
    assert checks[2].n_image_tokens == checks[5].n_image_tokens > 0  # one image left, as in the good record
    assert checks[2].n_tokens == checks[5].n_tokens
    report = summarize(checks)
    assert "note: trailing turn(s) after the last answer dropped in 1 record" in report
    assert f"note: {ANIMATED} in 1 record" in report
