"""Gemma 3: model.model.vision_tower (SigLIP), multi_modal_projector (pooling to `mm_tokens_per_image` tokens),
language_model (Gemma 3 text), lm_head.

Its attention is not plain causal: an image's tokens attend to each other both ways (the model reads
`token_type_ids`, which the processor writes), and most layers are sliding-window (5 of every 6 in the released
checkpoints). The trainer's packed path is causal varlen attention over whole samples: it would make image spans
causal and let no window apply, so packing is refused with that reason; padded batches keep transformers' own masks.
"""

from __future__ import annotations

import torch

from ds_vlm.models.base import Adapter, ModelParts, fixed_size_patches, llava_layout_parts


class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_types = ("gemma3",)
    # the processor expands it to "\n\n<start_of_image><image_soft_token>*N<end_of_image>\n\n"
    image_text = "<start_of_image>"
    image_fill = "<image_soft_token>"
    image_lead = "\n\n<start_of_image>"

    def parts(self, model) -> ModelParts:
        return llava_layout_parts(model, model.model.vision_tower.encoder.layers)  # the projector reads the last one

    def vision_depth_width(self, config) -> tuple[int, int]:
        return config.vision_config.num_hidden_layers, config.vision_config.hidden_size

    def dummy_image_size(self, processor) -> tuple[int, int]:
        """Every image is resized to the processor's one size (pan-and-scan crops off, as released)."""
        size = processor.image_processor.size
        side = (size.get("height") if isinstance(size, dict) else getattr(size, "height", None)) or 32
        return side, side

    def packing_refusal(self, config) -> str:
        text = config.get_text_config()
        kinds = list(getattr(text, "layer_types", None) or ())
        windowed = sum(t == "sliding_attention" for t in kinds)
        return (f"gemma3: image tokens attend both ways (token_type_ids) and {windowed} of {len(kinds)} "
                f"layers are sliding-window ({text.sliding_window} tokens); the packed path is causal attention over "
                "whole samples, which would change both. Train without --packing (padded batches keep the model's "
                "own masks)")

    def sequence_parallel_refusal(self, config) -> str:
        return ("gemma3: the model builds its sliding-window and bidirectional image masks from one rank's slice of "
                "the sequence, and Ulysses attention runs over the whole of it (measured by check-model: the first "
                "loss moved by 1.6e-3 relative); train without --sequence_parallel")

    def keep_images(self, encoded: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        """One pixel_values row per image (pan-and-scan off, as released; its crops would add rows)."""
        out = dict(encoded)
        if n_images == 0:
            return {k: v for k, v in out.items() if k != "pixel_values"}
        out["pixel_values"] = out["pixel_values"][:n_images]
        return out

    def vision_token_counts(self, encoded: dict[str, torch.Tensor], processor) -> dict[str, int]:
        """`image_seq_length` soft tokens per image (one pixel row each)."""
        pixels = encoded.get("pixel_values")
        return {"image": 0 if pixels is None else pixels.shape[0] * processor.image_seq_length}

    def patches_per_image(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        return fixed_size_patches(batch, config)
