"""The generic adapter: any image-text-to-text type transformers 5 maps to `AutoModelForImageTextToText` and ds-vlm
has no adapter for. It finds the towers by transformers 5's conventional module names, takes vision tensors and
token counts from the model's own processor, and packs only where the language tower's attention is plain causal.
What it cannot do correctly it refuses by name (UnsupportedModel), with the piece that is missing."""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn

from ds_vlm.models.base import Adapter, ModelParts, UnsupportedModel

VISION_NAMES = ("vision_tower", "visual", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "connector")
LANGUAGE_NAMES = ("language_model", "text_model")
MERGER_NAMES = ("merger", "projector")  # a projector kept inside the vision tower (Qwen-like layouts)
# Language towers whose attention is plain causal over 1-d positions (no sliding window, no bidirectional spans):
# the ones packing is allowed for. Others are refused by name until an adapter checks them.
PLAIN_CAUSAL_TEXT = frozenset({"llama", "qwen2", "qwen3", "mistral", "granite"})
VISION_KEYS = ("pixel_values", "image_sizes", "pixel_attention_mask", "image_grid_thw", "num_patches",
               "image_num_patches", "batch_num_images")
ROW_PER_IMAGE = ("pixel_values", "image_sizes")  # the keys keep_images can cut by image


@functools.lru_cache(maxsize=None)
def image_text_to_text_types() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return frozenset(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _child(module, names: tuple[str, ...]):
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return name, getattr(module, name)
    return None, None


def _longest_block_list(module: nn.Module) -> nn.ModuleList:
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=len) if lists else nn.ModuleList()


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


class GenericAdapter(Adapter):
    """One image-text-to-text `model_type` without an adapter of its own."""

    image_text = ""  # the processor's `image_token` is what the template writes (the encoder asks the processor)

    def __init__(self, model_type: str):
        self.family = model_type
        self.model_types = (model_type,)

    def _refuse(self, what: str) -> UnsupportedModel:
        return UnsupportedModel(f"model type {self.family!r} (generic adapter): {what}; it needs an adapter of its own "
                                "in ds_vlm/models/")

    def parts(self, model) -> ModelParts:
        inner = getattr(model, "model", None)
        if inner is None:
            raise self._refuse("no `model.model` (transformers 5's layout: model.model.<towers>, lm_head)")
        vision_name, vision = _child(inner, VISION_NAMES)
        projector_name, projector = _child(inner, PROJECTOR_NAMES)
        language_name, language = _child(inner, LANGUAGE_NAMES)
        head = model.get_output_embeddings()
        missing = [f"model.model.{'|'.join(names)}" for names, found in
                   ((VISION_NAMES, vision), (LANGUAGE_NAMES, language)) if found is None]
        missing += [] if head is not None else ["lm_head"]
        if missing:
            raise self._refuse(f"no {', '.join(missing)} found")
        vision_parts = [vision]
        if projector is None:  # a merger inside the vision tower (model.visual.merger)
            merger_name, projector = _child(vision, MERGER_NAMES)
            if projector is None:
                raise self._refuse(f"no projector found (model.model.{'|'.join(PROJECTOR_NAMES)} or "
                                   f"model.model.{vision_name}.{'|'.join(MERGER_NAMES)})")
            vision_parts = [c for n, c in vision.named_children() if n != merger_name and _has_parameters(c)]
        known = {vision_name, projector_name, language_name}
        stray = [f"model.model.{n}" for n, c in inner.named_children() if n not in known and _has_parameters(c)]
        stray += [f"model.{n}" for n, c in model.named_children()
                  if c is not inner and c is not head and _has_parameters(c)]
        if stray:
            raise self._refuse(f"{', '.join(stray)} belong(s) to no tower the generic adapter knows (vision, "
                               "projector, language)")
        # parameters of model.model itself (LLaVA-NeXT/OneVision's image_newline) train with the projector: they
        # are written between image features, like its output
        return ModelParts(vision=vision_parts, vision_blocks=_longest_block_list(vision), projector=[projector],
                          llm=[language, head], llm_decoder=language, vision_encoder=vision,
                          projector_parameters=list(inner.parameters(recurse=False)))

    def check_layout(self, config) -> None:
        """Refuse (UnsupportedModel) before any weight is read: the architecture built on the meta device."""
        from transformers import AutoModelForImageTextToText

        from ds_vlm.memplan.trace import no_zero3_init

        with torch.device("meta"), no_zero3_init():
            self.parts(AutoModelForImageTextToText.from_config(copy.deepcopy(config)))

    def vision_depth_width(self, config) -> tuple[int, int]:
        vision = config.vision_config
        depth = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None) or 0
        return depth, getattr(vision, "hidden_size", 0) or getattr(vision, "embed_dim", 0)

    def dummy_image_size(self, processor) -> tuple[int, int]:
        ip = processor.image_processor
        size = getattr(ip, "crop_size", None) or getattr(ip, "size", None)
        get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        patch = getattr(ip, "patch_size", None)
        patch = patch.get("height") if isinstance(patch, dict) else patch
        # a size-keeping processor (Pixtral): 4 x 4 patches, so the image has more than one token after a 2 x 2
        # merge (Mistral 3 squeezes a one-token image's features to a vector and fails to split them)
        side = get("height") or get("shortest_edge") or 4 * (patch or 8)
        return side, side

    def packing_refusal(self, config) -> str:
        text = config.get_text_config()
        rope = getattr(text, "rope_parameters", None) or {}
        if "mrope_section" in rope or "mrope_section" in (getattr(text, "rope_scaling", None) or {}):
            return (f"{self.family}: its rope takes multimodal (3-d) positions, which the generic adapter does not "
                    "compute per sample")
        if text.model_type not in PLAIN_CAUSAL_TEXT:
            return (f"{self.family}: its language tower ({text.model_type}) is not one the generic adapter knows to be "
                    f"plain causal ({', '.join(sorted(PLAIN_CAUSAL_TEXT))}); sliding windows or bidirectional spans "
                    "would be lost in a packed row")
        if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
            return f"{self.family}: its language tower has a sliding window, which the varlen path does not apply"
        return ""

    def sequence_parallel_refusal(self, config) -> str:
        """Ulysses keeps attention exact only where the mask is plain causal: the same condition as packing."""
        return self.packing_refusal(config)

    def keep_images(self, encoded: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        """Only whole-row cuts it can prove: every image dropped, or one pixel row per kept image."""
        if n_images == 0:
            return {k: v for k, v in encoded.items() if k not in VISION_KEYS}
        pixels = encoded.get("pixel_values")
        per_sample = [k for k in VISION_KEYS if k in encoded and k not in ROW_PER_IMAGE]
        if pixels is None or (pixels.shape[0] == n_images and not per_sample):
            return dict(encoded)
        raise self._refuse("truncation through a sample's images: the generic adapter cannot cut this processor's "
                           "vision tensors by image; raise --max_length or use --truncation skip")

    def patches_per_image(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        pixels = batch.get("pixel_values")
        patch = getattr(config.vision_config, "patch_size", 0)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch  # InternVL's [height, width]
        if pixels is None or pixels.dim() < 4 or not patch:
            return []
        rows = pixels.reshape(-1, *pixels.shape[-3:])
        return [(rows.shape[-2] // patch) * (rows.shape[-1] // patch)] * rows.shape[0]
