"""What the trainer needs to know about a model family, in one place per family.

Nothing outside `ds_vlm/models/` branches on a family or reads a family's config keys: the data path,
the engine, the metrics, the demo, the tests and the benchmarks ask the family's `Adapter`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn


class UnsupportedModel(ValueError):
    """A model, or one of its features, this trainer cannot train correctly; the message names the missing piece.
    Every verb prints it as one line."""


@dataclass
class ModelParts:
    """The three towers every supported VLM has, as lists of modules."""

    vision: list[nn.Module]        # the encoder, projector excluded
    vision_blocks: nn.ModuleList   # its transformer blocks whose output is used, in order (for last:N)
    projector: list[nn.Module]     # merger / multi-modal projector
    llm: list[nn.Module]           # language tower and LM head
    llm_decoder: nn.Module         # the module whose layers activation checkpointing wraps
    vision_encoder: Optional[nn.Module] = None  # the module whose blocks --vision_checkpointing wraps
    # parameters of no module of the projector that train with it (LLaVA-OneVision's model.model.image_newline)
    projector_parameters: list[nn.Parameter] = field(default_factory=list)


def llava_layout_parts(model: nn.Module, vision_blocks: nn.ModuleList) -> ModelParts:
    """The towers of transformers' LLaVA-style layout (model.model.vision_tower, multi_modal_projector,
    language_model; lm_head), the vision tower's blocks whose output is used being `vision_blocks`."""
    tower = model.model.vision_tower
    return ModelParts(vision=[tower], vision_blocks=vision_blocks, projector=[model.model.multi_modal_projector],
                      llm=[model.model.language_model, model.lm_head], llm_decoder=model.model.language_model,
                      vision_encoder=tower)


def cache_configs(config) -> list:
    """The configs whose `use_cache` the forward reads: the text config's, and the top-level one's where it has its
    own (SmolVLM's forward takes the top-level flag: a KV cache built there disables packing's block-diagonal mask)."""
    text = getattr(config, "text_config", config)
    return [text] + ([config] if config is not text and hasattr(config, "use_cache") else [])


def set_use_cache(config, value: bool) -> None:
    for c in cache_configs(config):
        c.use_cache = value


def fixed_size_patches(batch: dict[str, torch.Tensor], config) -> list[int]:
    """Patches of each image where every image is one fixed-size pixel row (the LLaVA-style processors)."""
    pixels = batch.get("pixel_values")
    if pixels is None:
        return []
    patch = config.vision_config.patch_size
    return [(pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)] * pixels.shape[0]


class Adapter:
    """One model family. Subclasses fill in the class attributes and the methods that differ."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    autoep_preset: Optional[str] = None  # DeepSpeed AutoEP's preset for the text MoE blocks (parallel/expert.py)
    # What the chat template writes for one image (and one video, if the family has a video path); the
    # processor expands it.
    image_text: str = ""
    video_text: str = ""
    # Whether every video must have the same number of frames (the model takes a batch's videos as one (videos,
    # frames, ...) tensor, LLaVA-OneVision): each is then sampled to exactly --video_max_frames frames.
    video_frames_fixed: bool = False
    # Whether the model takes a video's frames as images (SmolVLM: each frame one more image in `pixel_values`, its
    # features filling the image token after a timestamp line): no video token fills the ids (the frames' image
    # tokens are counted with the images'), and no dummy video keeps ranks in step (a micro-batch with a video has
    # `pixel_values`; one without gets the dummy image, which runs the same vision tower and projector).
    video_frames_as_images: bool = False
    # Where the family's chat template writes nothing after an answer (GLM: generation stops at the next role token
    # or <|endoftext|>), the texts generation stops at: a learned answer then ends with the stop the template writes
    # next (the next turn's role token), or, at the conversation's end, with the first one appended (LLaMA-Factory's
    # glm4v template does the same), so the model learns to stop. Empty: the template's own end of turn is learned.
    answer_stops: tuple[str, ...] = ()
    # The token an image's features fill in input_ids, where it is not the processor's `image_token` (Gemma 3's
    # template writes <start_of_image>, which the processor expands into a run of <image_soft_token>), and the
    # text the processor writes before that run (None: what `image_text` has before the image token). Truncation
    # keeps such runs whole, with their lead.
    image_fill: str = ""
    image_lead: Optional[str] = None
    # The token a video's features fill in input_ids, where it is not the processor's `video_token` (GLM-4.6V's
    # processor expands its <|video|> into frames of <|image|>). Where it is the image's fill token too, the
    # processor's `mm_token_type_ids` tell them apart (transformers' convention: 1 image, 2 video).
    video_fill: str = ""

    # -- the model -------------------------------------------------------------------------
    def parts(self, model: nn.Module) -> ModelParts:
        raise NotImplementedError

    def loading(self, zero3: bool):
        """A context around `from_pretrained` for load-time fixes this family needs (none by default)."""
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> None:
        """Changes to a loaded model that keep its weights and names but run faster or safer (none by default)."""

    def vision_depth_width(self, config) -> tuple[int, int]:
        """(blocks, hidden width) of the vision tower, for the FLOP count."""
        vision = config.vision_config
        return vision.depth, vision.hidden_size

    def packing_refusal(self, config) -> str:
        """Why --packing would not keep this model's attention exact ('' where it does): the trainer then refuses
        packing with this reason instead of training on a silent approximation."""
        return ""

    def check_layout(self, config) -> None:
        """Raise UnsupportedModel, naming the missing piece, for an architecture this adapter cannot take (checked
        before the weights load; a family's own adapter knows its layout)."""

    def sequence_parallel_refusal(self, config) -> str:
        """Why --sequence_parallel would not keep this model's attention exact ('' where it does): Ulysses hands
        each attention the whole sequence, but with the mask the model built from one rank's slice."""
        return ""

    def projector_rows(self, n_patches: int, config) -> int:
        """For the FLOP count: the rows the projector's matmuls run over for `n_patches` vision patches (one a
        patch by default)."""
        return n_patches

    # -- vision tensors ----------------------------------------------------------------------
    def process(self, processor, **kwargs) -> dict:
        """The processor's call on one piece of a rendered conversation with the images and videos it places
        (`text`, `images`, `videos`, ... as the processor takes them): the processor's own call by default."""
        return processor(**kwargs)

    def dummy_image_size(self, processor) -> tuple[int, int]:
        """The smallest image the processor and vision tower accept (keeps ZeRO ranks in step)."""
        ip = processor.image_processor
        side = getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 1)
        return side, side

    def keep_images(self, encoded: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
        """The encoded sample with the vision tensors of its first `n_images` images only (truncation)."""
        raise NotImplementedError

    def image_spans(self, ids: torch.Tensor, tokenizer) -> Optional[list[tuple[int, int]]]:
        """[start, end) of each whole image's tokens in a sample's ids, where an image is more than one run of its
        fill token with its lead (SmolVLM's tiles, each a run, with markers between); None: each run with its lead
        is one image (the encoder finds them)."""
        return None

    def truncate_vision(self, encoded: dict[str, torch.Tensor], n_images: int, n_runs: int) -> dict[str, torch.Tensor]:
        """The cut sample's vision tensors for its first `n_images` whole images, which hold `n_runs` runs of the
        fill token (keep_images by default, one run an image)."""
        return self.keep_images(encoded, n_images)

    def patches_per_image(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        """Vision-tower patches of each image of a batch (for the FLOP count)."""
        raise NotImplementedError

    def vision_attention_pairs(self, batch: dict[str, torch.Tensor], config) -> list[int]:
        """For the FLOP count: the query-key pairs each vision block's attention computes over a batch (the sum of
        its attended spans' lengths squared), block by block. Each image (a video's frame pair) whole by default."""
        pairs = sum(p * p for p in self.patches_per_image(batch, config))
        return [pairs] * self.vision_depth_width(config)[0]

    def vision_token_counts(self, encoded: dict[str, torch.Tensor], processor) -> dict[str, int]:
        """How many image (and video) tokens one encoded sample's vision tensors fill in its ids ({"image": n,
        "video": m}); the encoder refuses a record whose ids hold another count. Empty: not checked."""
        return {}

    def model_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch's tensors as the model's forward takes them, after the positions are computed (as
        collated by default; GLM-4.6V: its videos' frames as images, glm46v.py)."""
        return inputs

    def slice_per_token(self, language_kwargs: dict, start: int, end: int) -> dict:
        """For --sequence_parallel: the language model's inputs that hold one entry per token, besides the
        embeddings and position ids, cut to the tokens [start, end) (none by default)."""
        return language_kwargs

    def position_ids(self, config):
        """For --packing: a picklable function from one encoded sample to its position ids (they restart at 0
        at each sample; the collator concatenates them). Plain 1-d positions by default."""
        return TextPositions()

    def router_aux_loss_coef(self, config) -> float:
        """The weight of the MoE router's auxiliary loss in the training loss (0: none; moe.py)."""
        return 0.0

    def generation_kwargs(self) -> dict:
        """What `generate` must be given for this family to generate at all (none by default)."""
        return {}

    # Whether padded batches should carry the position ids too: where the model would otherwise compute them
    # on the device with host reads (Qwen's multimodal rope index), the collator does it on the host.
    padded_batch_positions: bool = False


class TextPositions:
    """0 .. L-1 for a sample of L tokens, shape (1, L)."""

    def __call__(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.arange(encoded["input_ids"].shape[1]).unsqueeze(0)
