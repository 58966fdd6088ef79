"""What the trainer needs to know about a model family, in one place per family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn


@dataclass
class ModelParts:
    """The three towers every supported VLM has, as lists of modules."""

    vision: list[nn.Module]        # the encoder, projector excluded
    vision_blocks: nn.ModuleList   # its transformer blocks whose output is used, in order (for last:N)
    projector: list[nn.Module]     # merger / multi-modal projector
    llm: list[nn.Module]           # language tower and LM head
    llm_decoder: nn.Module         # the module whose layers activation checkpointing wraps
    vision_encoder: Optional[nn.Module] = None  # the module whose blocks --vision_checkpointing wraps


class Adapter:
    """One model family. Subclasses fill in the class attributes and `parts`."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    # What the chat template writes for one image; the processor expands it.
    image_text: str = ""

    def parts(self, model: nn.Module) -> ModelParts:
        raise NotImplementedError

    def dummy_image_size(self, processor) -> tuple[int, int]:
        """The smallest image the processor and vision tower accept (keeps ZeRO ranks in step)."""
        ip = processor.image_processor
        side = getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 1)
        return side, side
