"""Sample -> input_ids, labels (assistant tokens only) and vision tensors.

Assistant spans come from the chat template itself: the text an assistant turn adds is
render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True). The
conversation is cut at those spans into segments; each segment goes through the real
processor (which expands image placeholders), and only assistant segments get labels.
No token id is hard-coded.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from ds_vlm.data.control_text import ControlText
from ds_vlm.data.formats import DataError, Sample
from ds_vlm.data.images import load_images
from ds_vlm.data.pixels import set_pixel_bounds, set_video_pixel_bounds
from ds_vlm.data.templates import template_message, typed_text_turns
from ds_vlm.data.videos import VideoSampling, load_videos

if TYPE_CHECKING:
    from ds_vlm.config import DataConfig

IGNORE_INDEX = -100


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where the loss is, (rows, length) booleans: position t predicts token t + 1, so it counts where the
    next token is a label (the last position never does). The one definition of a label target: preflight's
    counts, the collator's and the loss's rows all come from it."""
    following = torch.zeros_like(labels, dtype=torch.bool)
    following[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return following


def count_targets(labels: torch.Tensor) -> int:
    """Label tokens that enter the loss (next-token targets) in `labels` (rows, length)."""
    return int(target_positions(labels).sum())


class Encoder:
    """`truncation`: what an over-long sample does: error/skip raise DataError(too_long) (preflight
    stops or drops it), truncate cuts it at max_length, never inside an image's tokens."""

    def __init__(self, processor, adapter, max_length: int, truncation: str = "error",
                 video_sampling: VideoSampling | None = None):
        self.processor = processor
        self.video_sampling = video_sampling or VideoSampling()
        if adapter.video_frames_fixed:
            self.video_sampling = dataclasses.replace(self.video_sampling, exact=True)
        # the token the template writes for a video, which the processor expands; None: this family has no video path
        self.video_token = (getattr(processor, "video_token", None) or "<|video_pad|>") if adapter.video_text else None
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.adapter = adapter
        self.max_length = max_length
        self.truncation = truncation
        self.image_token = getattr(processor, "image_token", None) or adapter.image_text
        if not self.image_token:  # the generic adapter asks the processor; without one, nothing can be placed
            from ds_vlm.models import UnsupportedModel

            raise UnsupportedModel(f"model type {adapter.family!r}: its processor ({type(processor).__name__}) names "
                                   "no `image_token`, and the generic adapter knows no other way to place images")
        # the token an image's features fill (a run per image), and the tokens written before that run (e.g.
        # <|vision_start|>): truncation keeps both whole
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(adapter.image_fill or self.image_token)
        # the token a video's features fill in the ids (its frames' image token for GLM-4.6V); none where the
        # frames are images to the model (SmolVLM)
        self.video_token_id = (self.tokenizer.convert_tokens_to_ids(adapter.video_fill or self.video_token)
                               if self.video_token and not adapter.video_frames_as_images else None)
        self.control = ControlText(self.tokenizer)
        lead = adapter.image_lead if adapter.image_lead is not None else \
            adapter.image_text.split(self.image_token)[0] if self.image_token in adapter.image_text else ""
        self.image_lead = len(self.tokenizer(lead, add_special_tokens=False)["input_ids"]) if lead else 0
        # a segment with no image or video is only tokenized (several times faster than the processor's call,
        # most of which is argument checking); used only if it gives what the processor gives on a probe
        self._text_only_fast = False
        self._text_keys: frozenset = frozenset()  # the per-token keys the processor gives for text
        # the processor marks image/video tokens in `mm_token_type_ids` (all 0 in a text-only segment)
        self._mm_token_types = "mm_token_type_ids" in getattr(processor, "model_input_names", ())
        if self.video_token_id == self.image_token_id and not self._mm_token_types:
            from ds_vlm.models import UnsupportedModel

            raise UnsupportedModel(f"model type {adapter.family!r}: its videos' features fill its image token, and its "
                                   "processor gives no `mm_token_type_ids` to tell a video's tokens from an image's")
        probe = "<|im_start|>user\nA probe, 12 words: é ü 中文.<|im_end|>\n"
        processed = self._process(probe, [])
        self._text_keys = frozenset(processed)
        self._text_only_fast = _same_tensors(processed, self._tokenize(probe))
        self.typed_text = typed_text_turns(processor, adapter.family)

    def _tokenize(self, text: str, as_text: bool = False) -> dict[str, torch.Tensor]:
        """`text` through the tokenizer alone, with the keys the processor gives for text (token type ids of
        text: 0). `as_text`: special tokens spelled in it are text (processors drop `split_special_tokens`)."""
        out = dict(self.tokenizer([text], return_tensors="pt", add_special_tokens=False,
                                  **({"split_special_tokens": True} if as_text else {})))
        if self._mm_token_types:
            out["mm_token_type_ids"] = torch.zeros_like(out["input_ids"])
        if self._text_keys:
            out = {k: out[k] if k in out else torch.zeros_like(out["input_ids"]) for k in self._text_keys}
        return out

    # -- text -------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> str:
        return self.processor.apply_chat_template(
            [template_message(m, self.typed_text) for m in messages], tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}))

    @property
    def template_has_tools(self) -> bool:
        """Whether the chat template renders tool calls and tool results (it reads `tool_calls` and a `tool`
        role); without, a tool-use record would be rendered as something the model never sees at inference."""
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", "")
        template = template if isinstance(template, str) else str(template)
        return "tool_calls" in template and "tool" in template.replace("tool_calls", "")

    def segments(self, sample: Sample) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_assistant_target) pieces; an assistant turn with
        'loss': false is left in the text, not a target. The turns' text (tool calls and tools included) is
        escaped (control_text.py): a special token it spells is a marker here, which `encode` tokenizes as text."""
        try:
            return self._segments(sample)
        except DataError:
            raise
        except Exception as err:  # jinja2 errors, a template's raise_exception, type errors in a template
            raise DataError("bad_record", sample.source, sample.index, f"the chat template cannot render this "
                            f"conversation: {type(err).__name__}: {str(err)[:200]}") from err

    def _segments(self, sample: Sample) -> list[tuple[str, bool]]:
        messages, tools = self.control.escape_all(sample.messages), self.control.escape_all(sample.tools)
        if (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)) and not self.template_has_tools:
            raise DataError("bad_record", sample.source, sample.index, "tool-use turns (tool calls, tool results or "
                            "tools), but this model's chat template has no tool roles (no `tool_calls`, no `tool`)")
        full = self.render(messages, tools=tools)
        pieces, cursor = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or not message.get("learn", True):
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            upto = self.render(messages[: i + 1], tools=tools)
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise DataError("bad_record", sample.source, sample.index,
                                "the chat template does not render this conversation as a growing prefix, so the "
                                "assistant turns cannot be located; use a template without history rewriting")
            target = upto[len(prefix):].rstrip()
            full, target = self._with_stop(full, len(prefix) + len(target), target, sample)
            if len(prefix) > cursor:
                pieces.append((full[cursor:len(prefix)], False))
            pieces.append((target, True))
            cursor = len(prefix) + len(target)
        if cursor < len(full):
            pieces.append((full[cursor:], False))
        return pieces

    def _with_stop(self, full: str, end: int, target: str, sample: Sample) -> tuple[str, str]:
        """The adapter's `answer_stops`: an answer the template ends with none of them takes the stop written next
        (learned), or, where nothing follows, the first stop appended to the text."""
        stops = self.adapter.answer_stops
        if not stops or target.endswith(stops):
            return full, target
        after = full[end:]
        following = next((s for s in stops if after.startswith(s)), None)
        if following:
            return full, target + following
        if after.strip():
            raise DataError("bad_record", sample.source, sample.index, f"an answer is followed by {after[:30]!r}, "
                            f"none of the {self.adapter.family} stops {list(stops)}: its end cannot be learned")
        return full[:end] + stops[0] + after, target + stops[0]

    def spelled_control(self, sample: Sample) -> list[str]:
        """The control tokens the sample's text (turns, tool calls, tools) spells, sorted: encoded as text, said in
        a note."""
        return sorted(self.control.spelled_all([sample.messages, sample.tools]))

    # -- tensors ----------------------------------------------------------------------
    def encode_record(self, records, index: int) -> tuple[Sample, dict[str, torch.Tensor]]:
        """Record `index` of `records` (a RecordIndex) read, its media decoded and encoded: the one path preflight
        and the training dataset share. Raises DataError naming the record."""
        sample = records.sample(index)
        try:
            return sample, self.encode(sample, *self.media(sample))
        except DataError:
            raise
        except Exception as err:  # the processor, tokenizer or template on this record: a bad record, named
            detail = " ".join(str(err).split())[:300]
            raise DataError("bad_record", sample.source, sample.index,
                            f"{type(err).__name__} while encoding it: {detail}") from err

    def media(self, sample: Sample) -> tuple[list, list]:
        """The sample's decoded images and sampled videos (what `encode` takes)."""
        if sample.videos and self.video_token is None:
            raise DataError("unsupported_media", sample.source, sample.index,
                            f"{len(sample.videos)} video(s): the {self.adapter.family} family has no video path")
        return load_images(sample), load_videos(sample, self.video_sampling)

    def encode(self, sample: Sample, images: list, videos: list = ()) -> dict[str, torch.Tensor]:
        """Token ids, labels and vision tensors of one sample, each with a leading batch dim of 1. `videos`:
        (frames, metadata) pairs, as `media` gives them."""
        parts, images, videos = [], list(images), list(videos)
        for segment, is_target in self.segments(sample):
            for encoded in self._encode_rendered(segment, images, videos):
                ids = encoded["input_ids"]
                encoded["labels"] = ids.clone() if is_target else torch.full_like(ids, IGNORE_INDEX)
                parts.append(encoded)
        if images or videos:
            raise DataError("placeholder_mismatch", sample.source, sample.index,
                            f"the chat template placed fewer images or videos than the record has ({len(images)} "
                            f"image(s), {len(videos)} video(s) left over)")
        out = merge_parts(parts)
        self._check_vision_tokens(out, sample)
        spelled = [f"text spelling the control token {token}, encoded as plain text"
                   for token in self.spelled_control(sample)]
        sample.notes += [note for note in spelled if note not in sample.notes]
        length = out["input_ids"].shape[1]
        if length > self.max_length:
            if self.truncation != "truncate" or sample.videos:
                raise DataError("too_long", sample.source, sample.index,
                                f"{length} tokens (image and video tokens included) > --max_length {self.max_length}"
                                + (" (a sample with video is never truncated)" if sample.videos else ""))
            out = self._truncate(out, sample)
        if not (out["labels"] != IGNORE_INDEX).any():
            raise DataError("no_assistant_turn", sample.source, sample.index, "no assistant token to learn from")
        return out

    def _encode_rendered(self, rendered: str, images: list, videos: list) -> list[dict[str, torch.Tensor]]:
        """A rendered piece of conversation (its turns' text escaped) encoded: the template's structure through
        the processor with the images and videos it places (taken off the front of `images` and `videos`), a
        turn's text that spells special tokens as text."""
        parts = []
        for text, is_text in self.control.pieces(rendered):
            if is_text:
                parts.append(self._process(text, [], as_text=True))
                continue
            n_images = text.count(self.image_token)
            n_videos = text.count(self.video_token) if self.video_token else 0
            parts.append(self._process(text, images[:n_images], videos[:n_videos]))
            del images[:n_images], videos[:n_videos]
        return parts

    def prompt(self, sample: Sample, images: list, videos: list = ()) -> dict[str, torch.Tensor]:
        """What a model is given to answer the sample's last assistant turn (the turns before it, then the
        generation prompt), encoded as in training: a special token its text spells is text."""
        last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
        rendered = self.render(self.control.escape_all(sample.messages[:last]), add_generation_prompt=True,
                               tools=self.control.escape_all(sample.tools))
        return merge_parts(self._encode_rendered(rendered, list(images), list(videos)))

    def _check_vision_tokens(self, out: dict[str, torch.Tensor], sample: Sample) -> None:
        """The image (video) tokens in the ids must be as many as the vision tensors fill, or the model's forward
        fails mid-step ("Image features and image tokens do not match"); here the record is named instead."""
        expected = self.adapter.vision_token_counts(out, self.processor)
        counts = self.media_tokens(out)
        for what, found in counts.items():
            if what not in expected:
                continue
            if found != expected[what]:
                raise DataError("placeholder_mismatch", sample.source, sample.index,
                                f"{found} {what} token(s) in the encoded ids but the {what}s' vision tensors fill "
                                f"{expected[what]}: the chat template or the processor placed {what} tokens the "
                                f"{what}s do not match")

    def media_tokens(self, encoded: dict[str, torch.Tensor]) -> dict[str, int]:
        """The image tokens and (for a family with a video path) the video tokens in one encoded sample's ids: the
        tokens each one's features fill. Where both fill one token (GLM-4.6V), `mm_token_type_ids` tells them apart
        (1 image, 2 video)."""
        ids = encoded["input_ids"][0]
        video = self.video_token_id is not None
        fills = {"image": self.image_token_id, **({"video": self.video_token_id} if video else {})}
        if video and self.video_token_id == self.image_token_id:
            types = encoded["mm_token_type_ids"][0]
            return {what: int(((ids == token_id) & (types == kind)).sum())
                    for (what, token_id), kind in zip(fills.items(), (1, 2))}
        return {what: int((ids == token_id).sum()) for what, token_id in fills.items()}

    def _truncate(self, out: dict[str, torch.Tensor], sample: Sample) -> dict[str, torch.Tensor]:
        """Cut at max_length; a cut through an image moves before it (and its lead tokens), and
        the images after the cut leave the vision tensors too."""
        is_image = (out["input_ids"][0] == self.image_token_id).tolist()
        cut = self.max_length
        spans = self.adapter.image_spans(out["input_ids"][0], self.tokenizer)
        if spans is not None:  # images of several runs (tiles): a cut inside one moves before the whole image
            cut = next((start for start, end in spans if start < cut < end), cut)
        elif is_image[cut - 1] and is_image[cut]:
            while cut > 0 and is_image[cut - 1]:
                cut -= 1
            cut = max(0, cut - self.image_lead)
        kept_runs = sum(1 for i in range(cut) if is_image[i] and (i == 0 or not is_image[i - 1]))
        kept_images = kept_runs if spans is None else sum(1 for _, end in spans if end <= cut)
        if not (out["labels"][0, :cut] != IGNORE_INDEX).any():
            raise DataError("too_long", sample.source, sample.index,
                            f"{len(is_image)} tokens > --max_length {self.max_length}, and truncating would leave "
                            "no answer token")
        return self.adapter.truncate_vision({k: v[:, :cut] if k in TOKEN_KEYS else v for k, v in out.items()},
                                            kept_images, kept_runs)

    def dummy(self) -> dict[str, torch.Tensor]:
        """One tiny image and its tokens, all labels ignored: run through the vision tower when a
        micro-batch has no image, so every rank calls the same modules in the same order."""
        from PIL import Image

        image = Image.new("RGB", self.adapter.dummy_image_size(self.processor), (0, 0, 0))
        encoded = self._process(self.adapter.image_text or self.image_token, [image])
        encoded["labels"] = torch.full_like(encoded["input_ids"], IGNORE_INDEX)
        return encoded

    def dummy_video(self) -> dict[str, torch.Tensor]:
        """Two tiny black frames and their tokens, labels ignored: once any record has a video, a micro-batch
        without one gets this, so that every rank runs the vision tower on videos too."""
        from transformers.video_utils import VideoMetadata

        width, height = self.adapter.dummy_image_size(self.processor)
        frames = np.zeros((2, height, width, 3), dtype=np.uint8)
        metadata = VideoMetadata(total_num_frames=2, fps=self.video_sampling.fps, width=width, height=height,
                                 duration=2 / self.video_sampling.fps, frames_indices=np.arange(2))
        encoded = self._process(self.adapter.video_text, [], [(frames, metadata)])
        encoded["labels"] = torch.full_like(encoded["input_ids"], IGNORE_INDEX)
        return encoded

    def _process(self, text: str, images: list, videos: list = (), as_text: bool = False) -> dict[str, torch.Tensor]:
        """`as_text`: special tokens spelled in `text` are text (no images or videos with it)."""
        if as_text or (not images and not videos and self._text_only_fast):
            return self._tokenize(text, as_text)
        kwargs = {}
        if videos:  # frames sampled already, with the metadata the processor writes timestamps from
            kwargs = dict(videos=[frames for frames, _ in videos], video_metadata=[meta for _, meta in videos],
                          do_sample_frames=False)
        out = self.adapter.process(self.processor, text=[text], images=images or None, return_tensors="pt",
                                   add_special_tokens=False, **kwargs)
        return {k: torch.as_tensor(v) if k == "second_per_grid_ts" else v for k, v in out.items()
                if isinstance(v, torch.Tensor) or k == "second_per_grid_ts"}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def encoder_for(processor, adapter, config: DataConfig) -> "Encoder":
    """The Encoder the data section describes: pixel bounds applied to the processor, video sampling."""
    set_pixel_bounds(processor, config.min_pixels, config.max_pixels)
    set_video_pixel_bounds(processor, config.video_max_pixels)
    return Encoder(processor, adapter, config.max_length, config.truncation,
                   VideoSampling(config.video_fps, config.video_max_frames))


# Per-token tensors (padded along the sequence); everything else a processor returns is
# per-image (pixel_values, image_grid_thw, ...) and is concatenated along dim 0.
TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids"})


def merge_parts(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate segments: per-token tensors along the sequence, vision tensors along dim 0."""
    merged: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, []).append(value)
    return {key: torch.cat(values, dim=1) if key in TOKEN_KEYS else cat_rows(values) for key, values in merged.items()}


def cat_rows(values: list[torch.Tensor]) -> torch.Tensor:
    """Per-image tensors along dim 0. Images of different tile counts (LLaVA-OneVision's anyres: (images, tiles, C, H,
    W)) or sizes (Pixtral: (images, C, H, W) at each image's own size) are zero-padded to the largest first, as the
    processors pad a batch of their own: the models take the real tiles and pixels by the image sizes."""
    if len({v.shape[1:] for v in values}) > 1 and len({v.dim() for v in values}) == 1 and values[0].dim() >= 3:
        most = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
        values = [torch.nn.functional.pad(v, [p for d in reversed(range(1, v.dim()))
                                              for p in (0, most[d] - v.shape[d])]) for v in values]
    return torch.cat(values, dim=0)
