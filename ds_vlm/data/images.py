"""Open and check images; failures become DataError naming the record."""

from __future__ import annotations

import io
import os

from .formats import DataError, ImageRef, Sample


def load_image(ref: ImageRef, sample: Sample):
    """Decode one image fully to RGB (a truncated file fails here, not mid-training)."""
    from PIL import Image

    if ref.data is None and not os.path.isfile(ref.path):
        raise DataError("missing_image", sample.source, sample.index, f"image file {ref.path} does not exist")
    try:
        with Image.open(io.BytesIO(ref.data) if ref.data is not None else ref.path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt data
        raise DataError("unreadable_image", sample.source, sample.index,
                        f"cannot decode image {ref.describe()}: {type(err).__name__}: {err}") from err


def load_images(sample: Sample) -> list:
    return [load_image(ref, sample) for ref in sample.images]
