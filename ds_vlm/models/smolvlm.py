"""SmolVLM2 (transformers' `smolvlm`, the Idefics3 layout; `idefics3` itself takes this adapter too):
model.model.vision_model (SigLIP), connector (pixel shuffle + linear), text_model (Llama), lm_head; the generic
adapter's parts, with what the generic adapter cannot do by itself.

An image is a grid of tiles plus the global image, each tile a run of <image> tokens after <fake_token_around_image>
<row_r_col_c>, "\\n" after each row of tiles, and the global image after <fake_token_around_image><global-img>,
closed by <fake_token_around_image>. Its vision tensors are per sample: pixel_values (1, tiles, 3, H, W) with
pixel_attention_mask (1, tiles, H, W), the tiles of every image in order, each image's global image last. Truncation
keeps or drops an image whole: all its tiles, the global image and the marker tokens around them.

Packing: the text tower is plain causal Llama with 1-d positions, and the vision tower sees each tile alone, so a
packed row keeps every sample's attention exactly (the trainer must switch off the KV cache of the top-level config
as well as the text config's: SmolVLM's forward reads the top-level flag; models/base.py set_use_cache).
"""

from __future__ import annotations

from typing import Optional

import torch

from ds_vlm.models.generic import GenericAdapter

GLOBAL = "<global-img>"
AROUND = "<fake_token_around_image>"


class SmolVLMAdapter(GenericAdapter):
    """SmolVLM2 (`smolvlm`), and Idefics3 (`idefics3`), whose layout, processor and tokens SmolVLM took over (its
    text tower is Llama 3, its released template reads only typed parts: encode.typed_text_turns)."""

    def __init__(self, model_type: str = "smolvlm"):
        super().__init__(model_type)

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
        """`image_seq_len` <image> tokens per real tile."""
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
