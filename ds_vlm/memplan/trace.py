"""The planner's activations: one micro-batch's forward and backward run on fake tensors (shapes, no values,
no weights, no GPU), every storage followed from creation to release. ds_vlm/memplan/planner.py adds the model states.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from ds_vlm.memplan.live_bytes import LiveBytes


@dataclass
class Activations:
    tokens: int           # tokens of the traced micro-batch
    image_tokens: int
    peak: float           # activations and temporaries at the traced step's peak, bytes (one rank's: under
                          # sequence parallelism its slice)
    peak_with_grads: float = 0.0  # the same with the parameters' gradients as the backward makes them, kept
                                  # whole until the step (ZeRO 0/1)
    peak_moved_grads: float = 0.0  # the same with each gradient alive from its making until its parameter's
                                   # accumulation is done, when ZeRO 2/3 move it into their buckets (a tied
                                   # embedding's head gradient waits through the whole backward)
    by_part: dict = field(default_factory=dict)  # `peak`'s storages by what made them: the vision tower, the
                                                 # language tower, the loss, the backward's temporaries, other
    moved_before_first_grad: float = 0.0  # peak_moved_grads before the first gradient is accumulated, and from
    moved_from_first_grad: float = 0.0    # it on (ZeRO-1/2 allocate their buckets and partitions at that moment)


def worst_sample(encoder, n_tokens: int, n_image_tokens: int) -> dict:
    """A sample of about `n_tokens` tokens holding one image of about `n_image_tokens` tokens (the processor's
    own encoding of a blank image of that size, the rest an answer of filler words)."""
    from PIL import Image

    from ds_vlm.data.formats import Sample

    side = 64
    if n_image_tokens:
        patch = _merged_patch(encoder.processor.image_processor)
        side = max(patch, int(math.sqrt(n_image_tokens)) * patch)
    image = Image.new("RGB", (side, side), (127, 127, 127))
    words = max(1, n_tokens // 2)
    limit, encoder.max_length = encoder.max_length, 1 << 30  # the search may overshoot on the way
    try:
        return _fill(encoder, image, words, n_tokens, Sample)
    finally:
        encoder.max_length = limit


def _merged_patch(image_processor) -> int:
    """Pixels on a side of one image token (a patch, times the merge where the processor merges)."""
    patch = getattr(image_processor, "patch_size", None) or 14
    patch = patch.get("height", 14) if isinstance(patch, dict) else patch  # Pixtral's {height, width}
    return patch * (getattr(image_processor, "merge_size", None) or 1)


def largest_image_tokens(image_processor) -> int:
    """Image tokens of the largest image the processor makes: its largest area (Qwen's `longest_edge`), else its
    fixed size (crop_size, else 448 x 448)."""
    from ds_vlm.data.pixels import pixel_bounds

    area = pixel_bounds(image_processor)["longest_edge"]
    if area and not hasattr(image_processor, "temporal_patch_size"):  # an edge, not Qwen's area (Pixtral's)
        area = area * area
    if not area:
        crop = getattr(image_processor, "crop_size", None)
        height, width = ((crop.get("height"), crop.get("width")) if isinstance(crop, dict)
                         else (getattr(crop, "height", None), getattr(crop, "width", None)))
        area = height * width if height and width else 448 * 448
    return int(area // _merged_patch(image_processor) ** 2)


def worst_counts(checks, longest: int) -> tuple[int, int]:
    """(the longest sample's tokens, the most image tokens of a sample) among the records preflight passed;
    (`longest`, 0) where none did."""
    from ds_vlm.data.preflight import OK

    ok = checks.kind == OK
    if not ok.any():
        return longest, 0
    return int(checks.n_tokens[ok].max()), int(checks.n_image_tokens[ok].max())


def _fill(encoder, image, words: int, n_tokens: int, Sample) -> dict:
    for _ in range(6):  # a few refinements of the filler length: tokens are linear in words
        prompt = [{"type": "image"}, {"type": "text", "text": "Describe."}]
        sample = Sample(messages=[{"role": "user", "content": prompt, "learn": False},
                                  {"role": "assistant", "content": [{"type": "text", "text": " ".join(["ok"] * words)}],
                                   "learn": True}], source="plan", index=0)
        encoded = encoder.encode(sample, [image])
        have = encoded["input_ids"].shape[1]
        if have == n_tokens:
            break
        per_word = max(1e-3, (have - (encoded["input_ids"] == encoder.image_token_id).sum().item()) / max(1, words))
        words = max(1, words + int((n_tokens - have) / per_word))
    return encoded


def no_zero3_init():
    """A ZeRO-3 run's HfDeepSpeedConfig makes transformers build every model under deepspeed.zero.Init (which
    partitions with collectives): the planner's shape-only copies must be built plainly (the patch
    `hf_deepspeed_config_set_aside`)."""
    from ds_vlm.patches.transformers_loading import zero3_init_set_aside

    return zero3_init_set_aside()


TRACE_SP = "ds_vlm_trace_ulysses"


def _trace_sequence_parallel(group):
    """`group` (one rank of an SP group) for the trace: the trainer's own input slicing (SequenceParallel's
    hook, this rank's 1/sp of the tokens; the vision tower runs whole, as in the run), and an attention
    registered as TRACE_SP that stands in for Ulysses' all-to-all: each of q, k, v becomes a new tensor of the
    whole sequence and 1/sp of the heads (k, v repeated to sp heads where fewer, as DeepSpeed does), attended
    causally, and the output goes back to this rank's tokens and all heads. Same shapes and buffers, no
    values (fake tensors); a one-process trace of one rank."""
    import torch
    from transformers.masking_utils import sdpa_mask

    from ds_vlm.parallel.ulysses import SLICED
    from ds_vlm.patches.transformers_attention import register_attention

    sp = group.size

    class AllToAll(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, shape):
            ctx.shape = x.shape
            return x.new_empty(shape)

        @staticmethod
        def backward(ctx, grad):
            return grad.new_empty(ctx.shape), None

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if not kwargs.pop(SLICED, False):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        b, h, n, d = query.shape
        if key.shape[1] < sp:
            key, value = (t.repeat_interleave(sp // key.shape[1], dim=1) for t in (key, value))
        q = AllToAll.apply(query, (b, h // sp, n * sp, d))
        k, v = (AllToAll.apply(t, (b, t.shape[1] // sp, n * sp, d)) for t in (key, value))
        if k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        return AllToAll.apply(out.transpose(1, 2), (b, n, h, d)), None

    register_attention(TRACE_SP, attention, lambda *a, **k: None if group.armed else sdpa_mask(*a, **k))
    return group


def meta_model(config, adapter, model_config, attention: str | dict = "sdpa", dtype=None, sequence_parallel=None):
    """(the model, what trains: peft's wrapper with LoRA, else the model itself) on the meta device, prepared as
    the trainer prepares it (`prepare_for_training`, under the run's flags; `sequence_parallel`: the trace's
    one-rank group); built from a copy of `config` (from_config writes the attention choice into the config it is
    given) and never under deepspeed.zero.Init."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ds_vlm.models.loading import prepare_for_training

    with torch.device("meta"), no_zero3_init():
        model = AutoModelForImageTextToText.from_config(copy.deepcopy(config), attn_implementation=attention,
                                                        dtype=dtype)
    return model, prepare_for_training(model, adapter, model_config, sequence_parallel=sequence_parallel).trained


def trace_activations(config, model_config, adapter, micro, dtype, sp: int = 1) -> Activations:
    """The activation and temporary peak of one micro-batch's forward and backward, on fake tensors; with `sp`
    > 1, of the busiest rank of a sequence-parallel group (the one with the most label rows). Attention as the
    trainer runs it: sdpa (causal, no mask where nothing is padded), packed rows on the varlen interface."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ds_vlm.train.forward import ForwardContext
    from ds_vlm.train.loss import LabelLoss, LabelRows

    rows = LabelRows.from_labels(micro.labels)  # host-side inputs from real tensors first
    packed, attention = micro.cu_seq_lens is not None, "sdpa"
    if packed:  # the trainer's packed attention: the varlen interface given the samples' boundaries (no L x L)
        from ds_vlm.parallel.attention import VARLEN, register_varlen

        register_varlen()
        attention = VARLEN
    group = None
    if sp > 1:
        length = micro.labels.shape[1]
        from ds_vlm.parallel.ulysses import SequenceParallel

        ranks = [SequenceParallel(sp, r) for r in range(sp)]  # no process group: the slicing only
        group = _trace_sequence_parallel(max(ranks, key=lambda g: len(g.local_rows(rows, length))))
        rows = group.local_rows(rows, length)
        attention = {"text_config": TRACE_SP, "vision_config": attention}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # built on the meta device (peft's adapters too: its dtype moves cannot swap fake parameters), then given
    # fake storages
    model, trained = meta_model(config, adapter, model_config, attention, dtype, group)
    boundaries = None
    if packed:  # after the slicing hook, as in the trainer
        from ds_vlm.parallel.attention import SampleBoundaries

        boundaries = SampleBoundaries(adapter.parts(model).llm_decoder, stand_in_mask=True)
    with mode:
        trained.to_empty(device="cpu")
        trained.train()
        context = ForwardContext(LabelLoss(model, model_config.loss), torch.device("cpu"), dtype, boundaries,
                                 sequence_parallel=group)
        tracker = LiveBytes(mode)
        for param in (p for p in model.parameters() if p.requires_grad):
            param.register_post_accumulate_grad_hook(lambda p: tracker.moved(p.grad))
        parts = adapter.parts(model)
        for module in [*parts.vision, *parts.projector]:
            tracker.label(module, "vision tower")
        for module in [parts.llm_decoder, *getattr(parts.llm_decoder, "layers", [])]:  # layers: their recompute
            tracker.label(module, "language tower")
        tracker.label(model.get_output_embeddings(), "loss")
        # transformers' checks for a compile trace answered as on real tensors (ds_vlm/patches/transformers_trace.py)
        from ds_vlm.patches.transformers_trace import fake_tensors_run_as_real

        with tracker.mode, fake_tensors_run_as_real():
            with context.armed(micro, rows) as forward:
                inputs = dict(forward.inputs)
                mask = micro.inputs.get("attention_mask")
                if mask is not None and bool(mask.all()):  # decided on the host, as the model decides on real
                    inputs.pop("attention_mask")            # tensors: no padding, no mask (causal kernels)
                output = trained(**inputs)
            loss = forward.loss(output)
            tracker.part = "backward"  # the backward's own temporaries (a recomputed layer labels its own)
            loss.backward()
        grads = tracker.serials(p.grad for p in model.parameters() if p.grad is not None)
        peak, with_grads = tracker.peak(leave_out=grads), tracker.peak()
        by_part = tracker.parts_at_peak(leave_out=grads)
        first = tracker.first_grad if tracker.first_grad is not None else len(tracker.events)
        before, after = tracker.peak(moved=True, stop=first), tracker.peak(moved=True, start=first)
        moved = max(before, after)  # the whole walk, split at the first gradient
    image_tokens = int((micro.inputs["input_ids"] == getattr(config, "image_token_id", -1)).sum())
    return Activations(tokens=int(micro.inputs["input_ids"].numel()), image_tokens=image_tokens, peak=float(peak),
                       peak_with_grads=float(with_grads), peak_moved_grads=float(moved),
                       moved_before_first_grad=float(before), moved_from_first_grad=float(after),
                       by_part={k: float(v) for k, v in by_part.items()})


def worst_micro_batch(encoder, adapter, hf_config, batch, sp: int, longest: int, most_image: int):
    """The micro-batch the run's batching makes of its worst sample (`longest` tokens, `most_image` image
    tokens): as many copies as --max_tokens_per_batch holds, else --micro_batch_size, padded or packed."""
    from ds_vlm.data.batching import Collator

    collator = Collator.for_run(encoder, adapter, hf_config, batch, sp)
    sample = worst_sample(encoder, longest, most_image)
    # as many as the budget holds of the real longest sample (the stand-in may miss its length by a token)
    copies = (max(1, batch.max_tokens_per_batch // max(1, longest)) if batch.max_tokens_per_batch
              else batch.micro_batch_size)
    return collator([dict(sample) for _ in range(copies)])
