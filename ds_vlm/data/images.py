"""Open and check images, decoded as viewers and transformers' `load_image` show them; failures become
DataError naming the record.

What `to_rgb` does to a decoded file, each against a stated reference (tests/unit/data/test_images.py):
- EXIF orientation applied, as `PIL.ImageOps.exif_transpose` does (a phone photo taken upright trains
  upright; transformers' `load_image`, used at inference, rotates it too);
- 16-bit and 32-bit integer greyscale scaled to 8 bits (value >> 8; PIL's own `convert("RGB")` clips
  them, so a 16-bit PNG turns nearly white), float greyscale clipped to 0-255;
- transparency composited onto white (RGBA, LA, PA, and palette or greyscale images with a transparent
  colour): what a viewer on a white page shows, not the colour hidden under alpha 0;
- an animated file (GIF, APNG, WebP) read as its first frame; preflight counts such records.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from ds_vlm.data.formats import DataError, ImageRef, Sample

ANIMATED = "animated image: its first frame used"
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S")


def to_rgb(img):
    """One decoded PIL image (its first frame) as 8-bit RGB, oriented and composited as described above."""
    from PIL import Image, ImageOps

    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    oriented = ImageOps.exif_transpose(img)
    img = oriented if oriented is not None else img
    if img.mode in _WIDE_GREY:
        values = np.asarray(img).astype(np.int64)
        shift = 8 if img.mode != "I" or values.max(initial=0) <= 0xFFFF else 24  # "I" holds 16-bit PNGs too
        return Image.fromarray(np.clip(values >> shift, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(ref: ImageRef, sample: Sample, modes: list | None = None):
    """Decode one image fully to RGB (a truncated file fails here, not mid-training), sized by the record's own
    bounds for it if any; `modes`, if given, gets the file's mode as decoded (before conversion)."""
    from PIL import Image

    if ref.data is None and not os.path.isfile(ref.path):
        target = os.path.join(os.path.dirname(ref.path), os.readlink(ref.path)) if os.path.islink(ref.path) else ""
        raise DataError("missing_image", sample.source, sample.index, f"image file {ref.path} "
                        + (f"is a symlink to {os.path.normpath(target)}, which does not exist" if target
                           else "does not exist"))
    if _is_svg(ref):
        raise DataError("unsupported_media", sample.source, sample.index, f"image {ref.describe()} is an SVG, a "
                        "vector format: rasterise it first (e.g. `rsvg-convert -w 1024 in.svg > out.png`)")
    try:
        with Image.open(io.BytesIO(ref.data) if ref.data is not None else ref.path) as img:
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                sample.notes.append(ANIMATED)
            if modes is not None:
                modes.append(img.mode)
            return resized(to_rgb(img), ref)
    except Exception as err:  # PIL raises many types for corrupt data
        raise DataError("unreadable_image", sample.source, sample.index,
                        f"cannot decode image {ref.describe()}: {type(err).__name__}: {err}") from err


def resized(img, ref: ImageRef):
    """The record's own size for this image (qwen-vl-utils' `resized_height`/`resized_width`), or its area brought
    within its `min_pixels`/`max_pixels`, aspect kept; the processor then rounds it to its patch grid and applies
    its own bounds, as it does to an image qwen-vl-utils resized."""
    from PIL import Image

    if ref.resized:
        height, width = ref.resized
        return img.resize((width, height), Image.Resampling.BICUBIC)
    area = img.width * img.height
    scale = 1.0
    if ref.max_pixels and area > ref.max_pixels:
        scale = math.sqrt(ref.max_pixels / area)
    elif ref.min_pixels and area < ref.min_pixels:
        scale = math.sqrt(ref.min_pixels / area)
    if scale == 1.0:
        return img
    round_ = math.floor if scale < 1 else math.ceil
    size = (max(1, round_(img.width * scale)), max(1, round_(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def _is_svg(ref: ImageRef) -> bool:
    if ref.data is None:
        if ref.path.lower().endswith((".svg", ".svgz")):
            return True
        with open(ref.path, "rb") as f:
            head = f.read(1024)
    else:
        head = ref.data[:1024]
    head = head.lstrip().lower()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head)


def load_images(sample: Sample) -> list:
    return [load_image(ref, sample) for ref in sample.images]
