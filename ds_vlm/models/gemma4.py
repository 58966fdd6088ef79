"""Gemma 4: model.model.vision_tower (patch embedder, encoder, pooler), embed_vision (the projector into the text
width), language_model (Gemma 4 text: per-layer inputs, sliding-window and global layers), lm_head.

As Gemma 3, its attention is not plain causal: with `use_bidirectional_attention="vision"` (the released
checkpoints) an image's tokens attend to each other both ways (the model reads `mm_token_type_ids`, which the
processor writes), and most layers are sliding-window. The trainer's packed path is causal varlen attention over
whole samples, which would change both, so packing is refused with that reason; padded batches keep transformers'
own masks. Sequence parallelism is refused alike (the masks would be built from one rank's slice).

The audio tower (model.model.audio_tower, embed_audio; the E2B/E4B checkpoints) is left out: the tiny model has
none, and a checkpoint that has one is refused by name before its weights load (no trainable group holds it yet).
Video is not wired.
"""

from __future__ import annotations

import torch

from ds_vlm.models.base import Adapter, ModelParts, UnsupportedModel

IMAGE_KEYS = ("pixel_values", "image_position_ids")


class Gemma4Adapter(Adapter):
    family = "gemma4"
    model_types = ("gemma4",)
    # the processor expands it to <|image> + a soft <|image|> per pooled patch + <image|>
    image_text = "<|image|>"
    image_fill = "<|image|>"
    image_lead = "<|image>"

    def parts(self, model) -> ModelParts:
        inner = model.model
        if getattr(inner, "audio_tower", None) is not None:
            raise UnsupportedModel(self._audio_refusal())
        tower = getattr(inner, "vision_tower", None)
        if tower is None:
            raise UnsupportedModel("gemma4: this checkpoint has no vision tower (vision_config is null)")
        return ModelParts(vision=[tower], vision_blocks=tower.encoder.layers, projector=[inner.embed_vision],
                          llm=[inner.language_model, model.lm_head], llm_decoder=inner.language_model,
                          vision_encoder=tower)

    @staticmethod
    def _audio_refusal() -> str:
        return ("gemma4: this checkpoint has an audio tower (model.model.audio_tower, embed_audio), which ds-vlm "
                "neither trains nor holds frozen in a parameter group yet; use a checkpoint without audio")

    def check_layout(self, config) -> None:
        if getattr(config, "audio_config", None) is not None:
            raise UnsupportedModel(self._audio_refusal())
        if getattr(config, "vision_config", None) is None:
            raise UnsupportedModel("gemma4: this checkpoint has no vision tower (vision_config is null)")

    def vision_depth_width(self, config) -> tuple[int, int]:
        return config.vision_config.num_hidden_layers, config.vision_config.hidden_size

    def projector_rows(self, n_patches: int, config) -> int:
        """The embedder projects each pooled patch (pooling_kernel_size squared patches) once."""
        return n_patches // config.vision_config.pooling_kernel_size ** 2

    def dummy_image_size(self, processor) -> tuple[int, int]:
        """Any image is resized to the soft-token budget; the smallest square one that keeps its side."""
        ip = processor.image_processor
        side = ip.patch_size * ip.pooling_kernel_size
        return side, side

    def packing_refusal(self, config) -> str:
        text = config.get_text_config()
        kinds = list(getattr(text, "layer_types", None) or ())
        windowed = sum(t == "sliding_attention" for t in kinds)
        both_ways = getattr(text, "use_bidirectional_attention", None)
        return (f"gemma4: image tokens attend both ways (use_bidirectional_attention={both_ways!r}) and {windowed} of "
                f"{len(kinds)} layers are sliding-window ({text.sliding_window} tokens); the packed path is causal "
                "attention over whole samples, which would change both. Train without --packing (padded batches keep "
                "the model's own masks)")

    def sequence_parallel_refusal(self, config) -> str:
        return ("gemma4: the model builds its sliding-window and bidirectional image masks from one rank's slice of "
                "the sequence, and Ulysses attention runs over the whole of it; train without --sequence_parallel")

    def keep_images(self, encoded: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        """One row of patches (and of patch positions) per image."""
        if n_images == 0:
            return {k: v for k, v in encoded.items() if k not in IMAGE_KEYS}
        out = dict(encoded)
        for key in IMAGE_KEYS:
            if key in out:
                out[key] = out[key][:n_images]
        return out

    def patches_per_image(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        """The real patches of each image (rows are padded to the batch's longest, at position (-1, -1))."""
        positions = batch.get("image_position_ids")
        if positions is None:
            return []
        return [int(n) for n in (positions != -1).all(dim=-1).sum(dim=-1).tolist()]

    def vision_token_counts(self, encoded: dict[str, torch.Tensor], processor) -> dict[str, int]:
        """One soft token per pooled patch."""
        positions = encoded.get("image_position_ids")
        if positions is None:
            return {"image": 0}
        k = processor.image_processor.pooling_kernel_size
        return {"image": int((positions != -1).all(dim=-1).sum()) // k ** 2}
