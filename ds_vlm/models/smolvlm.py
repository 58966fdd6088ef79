"""SmolVLM2 (transformers' `smolvlm`, the Idefics3 layout; `idefics3` itself takes this adapter too):
model.model.vision_model (SigLIP), connector (pixel shuffle + linear), text_model (Llama), lm_head; the generic
adapter's parts, with what the generic adapter cannot do by itself.

An image is a grid of tiles plus the global image, each tile a run of <image> tokens after <fake_token_around_image>
<row_r_col_c>, "\\n" after each row of tiles, and the global image after <fake_token_around_image><global-img>,
closed by <fake_token_around_image>. Its vision tensors are per sample: pixel_values (1, tiles, 3, H, W) with
pixel_attention_mask (1, tiles, H, W), the tiles of every image in order, each image's global image last. Truncation
keeps or drops an image whole: all its tiles, the global image and the marker tokens around them.

A video (SmolVLM2 only: Idefics3's processor has none, and its records with video are refused by name) is frames that
the model takes as images: the template writes <video>, which the processor expands into "You are provided the
following series of <N in words> frames from a <H:MM:SS> [H:MM:SS] video.\n", then per frame "\nFrame from
<MM:SS>:" and the frame as one global image (<fake_token_around_image><global-img>, image_seq_len <image>,
<fake_token_around_image>; no tiles), then "\n\n". The frames (resized to one tile) go into pixel_values after the
tiles of the images before them: every frame is one more tile to the vision tower, the token count, truncation
(a sample with video is never cut) and the FLOP count. The processor merges its image and video outputs by key, so in
a call with both the videos' pixel_values would replace the images' (`process` rebuilds them in the tokens' order).

Packing: the text tower is plain causal Llama with 1-d positions, and the vision tower sees each tile alone, so a
packed row keeps every sample's attention exactly (the trainer must switch off the KV cache of the top-level config
as well as the text config's: SmolVLM's forward reads the top-level flag; models/base.py set_use_cache).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ds_vlm.models.generic import GenericAdapter

GLOBAL = "<global-img>"
AROUND = "<fake_token_around_image>"
VIDEO = "<video>"  # what SmolVLM2's template writes for a video part (the processor's `video_token`)


class SmolVLMAdapter(GenericAdapter):
    """SmolVLM2 (`smolvlm`), and Idefics3 (`idefics3`), whose layout, processor and tokens SmolVLM took over (its
    text tower is Llama 3, its released template reads only typed parts: templates.typed_text_turns)."""

    video_frames_as_images = True  # a frame is one more global image in pixel_values: no video token, no dummy video

    def __init__(self, model_type: str = "smolvlm"):
        super().__init__(model_type)
        # SmolVLM2's processor has a video processor; Idefics3's has none, so idefics3 keeps refusing video by name
        self.video_text = VIDEO if model_type == "smolvlm" else ""

    def process(self, processor, **kwargs) -> dict:
        """The processor's call; where it places images and videos both, the pixel rows rebuilt in the order of
        their placeholders. The processor merges its image and video outputs by key (transformers 5's
        ProcessorMixin.__call__), so the videos' pixel_values (and mask) replace the images'; its ids are right.
        Each image and video is then run through the processor alone, and their real tiles and frames are put one
        after another as their placeholders come in the text, the order in which the model fills the image tokens
        (one row, tiles zero-padded to the largest tile, as a batch pads them)."""
        out = processor(**kwargs)
        images, videos = kwargs.pop("images", None), kwargs.pop("videos", None)
        if not (images and videos):
            return out
        text, metadata = kwargs.pop("text"), kwargs.pop("video_metadata")
        images, videos = iter(images), iter(zip(videos, metadata))
        image, video = processor.image_token, processor.video_token
        pixels, masks = [], []
        for placeholder in re.findall(f"{re.escape(image)}|{re.escape(video)}", text[0]):
            if placeholder == image:
                one = processor(text=[image], images=[next(images)], **kwargs)
            else:
                frames, meta = next(videos)
                one = processor(text=[video], videos=[frames], video_metadata=[meta], **kwargs)
            tiles, mask = real_tiles(one)
            pixels.append(tiles)
            masks.append(mask)
        out["pixel_values"] = padded_cat(pixels).unsqueeze(0)
        if "pixel_attention_mask" in out:
            out["pixel_attention_mask"] = padded_cat(masks).unsqueeze(0)
        return out

    def image_spans(self, ids: torch.Tensor, tokenizer) -> Optional[list[tuple[int, int]]]:
        """[start, end) of each whole image in `ids`: from its first <fake_token_around_image> to the one closing
        its global image."""
        around, global_img = tokenizer.convert_tokens_to_ids(AROUND), tokenizer.convert_tokens_to_ids(GLOBAL)
        ids = ids.tolist()
        spans, start = [], None
        i = 0
        while i < len(ids):
            if ids[i] == around and start is None:
                start = i
            if ids[i] == global_img:
                if start is None:  # a <global-img> with no opening marker: not the processor's layout
                    start = i
                j = i + 1
                while j < len(ids) and ids[j] != around:
                    j += 1
                spans.append((start, min(j + 1, len(ids))))
                start, i = None, j + 1
                continue
            i += 1
        return spans

    def truncate_vision(self, encoded: dict[str, torch.Tensor], n_images: int, n_runs: int) -> dict[str, torch.Tensor]:
        """The first `n_runs` tiles (every tile and global image is one run of <image> tokens), as one row."""
        if n_images == 0:
            return {k: v for k, v in encoded.items() if k not in PIXEL_KEYS}
        out = dict(encoded)
        pixels, mask = real_tiles(encoded)
        out["pixel_values"] = pixels[:n_runs].unsqueeze(0)
        if "pixel_attention_mask" in out:
            out["pixel_attention_mask"] = mask[:n_runs].unsqueeze(0)
        return out

    def keep_images(self, encoded: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError("SmolVLM cuts its tiles by truncate_vision")

    def patches_per_image(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        """Patches of each real tile (the all-zero tiles padding a batch are dropped by the model)."""
        if batch.get("pixel_values") is None:
            return []
        pixels, _ = real_tiles(batch)
        patch = config.vision_config.patch_size
        return [(pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)] * pixels.shape[0]

    def vision_token_counts(self, encoded: dict[str, torch.Tensor], processor) -> dict[str, int]:
        """`image_seq_len` <image> tokens per real tile, a video's frames included (each one global image)."""
        if encoded.get("pixel_values") is None:
            return {"image": 0}
        return {"image": real_tiles(encoded)[0].shape[0] * processor.image_seq_len}


PIXEL_KEYS = ("pixel_values", "pixel_attention_mask")


def real_tiles(encoded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles, 3, H, W) pixels and (tiles, H, W) masks of the real tiles, in order: a sample encoded in segments holds
    (segments, tiles, ...), zero-padded to the segment with the most tiles, as a batch is; the model drops all-zero
    tiles the same way."""
    pixels = encoded["pixel_values"]
    pixels = pixels.reshape(-1, *pixels.shape[-3:])
    mask = encoded.get("pixel_attention_mask")
    mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.bool) if mask is None else \
        mask.reshape(-1, *mask.shape[-2:])
    real = (pixels != 0).flatten(1).any(dim=1)
    return pixels[real], mask[real]


def padded_cat(rows: list[torch.Tensor]) -> torch.Tensor:
    """Tiles (n, ..., H, W) concatenated along n, zero-padded at the bottom and right to the largest H and W (a
    pixel mask's padding is 0: not attended), as the processor pads the tiles of a batch."""
    height, width = max(r.shape[-2] for r in rows), max(r.shape[-1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1], 0, height - r.shape[-2])) for r in rows])
