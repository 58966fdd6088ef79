"""LLaVA in the llava-hf layout: model.model.vision_tower (CLIP-like), multi_modal_projector, language_model."""

from __future__ import annotations

from .base import Adapter, ModelParts


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
        return ModelParts(
            vision=[tower],
            vision_blocks=layers[:used],
            projector=[model.model.multi_modal_projector],
            llm=[model.model.language_model, model.lm_head],
            llm_decoder=model.model.language_model,
            vision_encoder=tower,
        )

    def dummy_image_size(self, processor) -> tuple[int, int]:
        """The image processor resizes and crops every image to one size; use that size."""
        crop = getattr(processor.image_processor, "crop_size", None)  # a dict or transformers' SizeDict
        side = (crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)) or 14
        return side, side
