"""LLaVA in the llava-hf layout: model.model.vision_tower (CLIP-like), multi_modal_projector, language_model."""

from __future__ import annotations

import torch

from ds_vlm.models.base import Adapter, ModelParts, fixed_size_patches, llava_layout_parts


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    image_text = "<image>"

    def parts(self, model) -> ModelParts:
        tower = model.model.vision_tower
        layers = tower.encoder.layers
        # The projector reads hidden_states[vision_feature_layer]; blocks after it never reach the
        # loss, so `last:N` counts from the last block that does.
        feature_layers = model.config.vision_feature_layer
        deepest = max(feature_layers) if isinstance(feature_layers, (list, tuple)) else feature_layers
        used = deepest % (len(layers) + 1)  # hidden_states[0] is the embedding output
        return llava_layout_parts(model, layers[:used])

    def vision_depth_width(self, config) -> tuple[int, int]:
        return config.vision_config.num_hidden_layers, config.vision_config.hidden_size

    def dummy_image_size(self, processor) -> tuple[int, int]:
        """The image processor resizes and crops every image to one size; use that size."""
        crop = getattr(processor.image_processor, "crop_size", None)  # a dict or transformers' SizeDict
        side = (crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)) or 14
        return side, side

    def keep_images(self, encoded: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        """One pixel_values row per image."""
        out = dict(encoded)
        if n_images == 0:
            return {k: v for k, v in out.items() if k not in ("pixel_values", "image_sizes")}
        out["pixel_values"] = out["pixel_values"][:n_images]
        if "image_sizes" in out:
            out["image_sizes"] = out["image_sizes"][:n_images]
        return out

    def vision_token_counts(self, encoded: dict[str, torch.Tensor], processor) -> dict[str, int]:
        """A fixed count per image, as LlavaProcessor expands `<image>`: the patch grid (+ the CLS token the
        "full" feature strategy keeps)."""
        patch = getattr(processor, "patch_size", None)
        pixels = encoded.get("pixel_values")
        if not patch:
            return {}
        if pixels is None:
            return {"image": 0}
        per_image = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch) + processor.num_additional_image_tokens
        per_image -= processor.vision_feature_select_strategy == "default"
        return {"image": int(pixels.shape[0]) * per_image}

    def patches_per_image(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        return fixed_size_patches(batch, config)
