"""What the Qwen-VL families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE) share: the vision tokens,
patch rows with a (t, h, w) grid per image, the rope index, the patch embedding."""

from __future__ import annotations

import torch

from ds_vlm.models.base import Adapter
from ds_vlm.patches.torch_modules import use_patch_projection


class QwenVLAdapter(Adapter):
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    video_text = "<|vision_start|><|video_pad|><|vision_end|>"
    padded_batch_positions = True

    def prepare(self, model) -> None:
        """The vision tower's patch embedding as a linear layer (the patch `qwen_patch_embedding_as_linear`); with
        the varlen interface, the vision tower's attention gets its images' boundaries (route_vision_varlen)."""
        from ds_vlm.parallel.attention import route_vision_varlen

        use_patch_projection(model.model.visual.patch_embed.proj)
        route_vision_varlen(model.model.visual.config)

    def projector_rows(self, n_patches: int, config) -> int:
        """The mergers concatenate each merge x merge square of patches into one row (4 x the width) before their
        matmuls: a row per image token."""
        return n_patches // config.vision_config.spatial_merge_size ** 2

    def keep_images(self, encoded: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        out = dict(encoded)
        if n_images == 0:
            return {k: v for k, v in out.items() if k not in ("pixel_values", "image_grid_thw")}
        rows = int(out["image_grid_thw"][:n_images].prod(-1).sum())
        out["pixel_values"], out["image_grid_thw"] = out["pixel_values"][:rows], out["image_grid_thw"][:n_images]
        return out

    def patches_per_image(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        """Images' and videos' patches (a video's attention runs within each frame pair: t x (h w)^2)."""
        out = []
        for key in ("image_grid_thw", "video_grid_thw"):
            grid = batch.get(key)
            out += [] if grid is None else [int(h * w) for t, h, w in grid.tolist() for _ in range(t)]
        return out

    def vision_token_counts(self, encoded: dict[str, torch.Tensor], processor) -> dict[str, int]:
        """One token per merged patch: the (t, h, w) grid's patches over merge_size squared."""
        out = {}
        for what, sub in (("image", "image_processor"), ("video", "video_processor")):
            grid = encoded.get(f"{what}_grid_thw")
            merge = getattr(getattr(processor, sub, None), "merge_size", None)
            if merge:
                out[what] = 0 if grid is None else int(grid.prod(-1).sum()) // merge ** 2
        return out

    def position_ids(self, config) -> "RopeIndex":
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        return RopeIndex(MODEL_MAPPING[type(config)], config)


class RopeIndex:
    """The model's own multimodal rope index (`get_rope_index`) for one sample, without the model: it needs
    only the config, so a DataLoader worker can run it. Returns (4, 1, L): the text positions, which
    transformers reads to find where packed samples begin, then the 3 rows of mrope (temporal, height,
    width). With 3 rows only, transformers would see one sequence and attend across samples."""

    def __init__(self, model_class, config):
        self.model_class, self.config = model_class, config

    def get_vision_position_ids(self, *args, **kwargs):  # what get_rope_index calls on its model
        return self.model_class.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = {k: encoded[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in encoded}
        mrope, _ = self.model_class.get_rope_index(self, encoded["input_ids"], encoded["mm_token_type_ids"], **extra)
        text = torch.arange(encoded["input_ids"].shape[1]).view(1, 1, -1)
        return torch.cat([text, mrope], dim=0)
