"""Ulysses sequence parallelism for VLMs (--sequence_parallel N), on DeepSpeed's `UlyssesSPAttentionHF`.

Ranks form groups of N consecutive ranks (DeepSpeed's `parallel_state_sp`); each group trains on the same
samples, each rank holding 1/N of every sequence; data parallelism runs over the groups. What this module
adds to DeepSpeed's attention wrapper is the VLM glue:
- the vision tower runs on the whole sequence on every rank of a group (it is replicated, not split); a
  forward pre-hook on the language model (a named patch, ds_vlm/patches/) then gives each rank its slice of the input
  embeddings, of the position ids (every row: transformers' text row and mrope's 3) and of what the adapter says is
  per-token (Qwen3-VL: the visual position mask and the matching deepstack features);
- the wrapper is registered under its own attention name for the text model only; the vision tower keeps
  its own attention (the wrapper would fail its position-ids check there);
- linear-attention layers (Qwen3.5's Gated DeltaNet) are not attention calls: `install` hands them the group,
  and they run their conv and delta rule on whole sequences for 1/N of their heads between two all-to-alls
  of their own (`sequence_to_heads`, `heads_to_sequence`; linear_attention.py);
- inside the wrapper the core attention is sample-aware: with --packing a row holds several samples, whose
  boundaries over the whole sequence the collator knows (`SampleBoundaries` hands them to the language
  model; after the all-to-all each rank holds the whole sequence for its heads): the varlen interface
  (attention.py) keeps each sample to itself with no host sync and no L x L mask; plain sdpa would attend
  across samples;
- the loss: labels are shifted on the whole sequence, then each rank keeps the label rows of its slice, so
  each label token is counted once in the global count.
DeepSpeed itself is initialised for plain data parallelism over all ranks (no `mpu`): with an SP mpu its
gradient averaging divides by the data-parallel size on every path but ZeRO-3's reduce-scatter, which
divides by the whole world (so ZeRO-3 came out 1/N of the right gradient). Over all ranks every path
divides by the world size, each rank's gradient is its slice's share, and the loss scale (world size /
global label count) makes the update the token-level mean whatever the stage.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

import ds_vlm.parallel.linear_attention as linear_attention
import ds_vlm.runtime.distributed as comm
from ds_vlm.parallel import ParallelLayout
from ds_vlm.parallel.attention import varlen_attention
from ds_vlm.parallel.linear_attention import has_linear_attention
from ds_vlm.patches.deepspeed_ulysses import SLICED, ulysses_class
from ds_vlm.patches.transformers_attention import attention_function, register_attention, rewrite_forward_kwargs
from ds_vlm.train.loss import LabelRows

ULYSSES = "ds_vlm_ulysses"




class SequenceParallel:
    """This rank's sequence-parallel group (`layout`: consecutive ranks, DeepSpeed's parallel_state_sp), the
    attention wrapper the text model is loaded with, and the slicing of the language model's inputs; active
    only while armed (ForwardContext arms it for a training or evaluation forward; generation runs whole)."""

    def __init__(self, layout: ParallelLayout):
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

        mpu.initialize_sequence_parallel(sequence_parallel_size=layout.sp_size)
        self.layout, self.size, self.rank = layout, layout.sp_size, layout.sp_rank
        self.group = mpu.get_sequence_parallel_group()
        self.armed = False

    # -- setup ------------------------------------------------------------------------------
    def attn_implementation(self, core: str, model_config) -> dict:
        """Register the Ulysses wrapper around the sample-aware `core` attention; returns what from_pretrained
        takes: the wrapper for the text model, `core` for the vision tower."""
        from transformers.masking_utils import sdpa_mask

        if has_linear_attention(model_config):  # each rank runs whole sequences for 1/N of their heads
            text = model_config.get_text_config()
            heads = (text.linear_num_key_heads, text.linear_num_value_heads)
            if any(h % self.size for h in heads):
                raise ValueError(f"--sequence_parallel {self.size}: the linear-attention layers' {heads[0]} key and "
                                 f"{heads[1]} value heads do not split evenly over it")
        if core == "eager":
            raise ValueError("--sequence_parallel needs sdpa, varlen or flash_attention_2 attention, not eager")
        text = model_config.get_text_config()
        # sample-aware core attention: the packed row's boundaries come from SampleBoundaries (host numbers, the
        # whole sequence's: after the all-to-all each rank holds all of it for its heads), unpacked rows attend
        # causally without a mask (padding is at the end of a row)
        core_attention = attention_function(core) if core == "flash_attention_2" else varlen_attention
        wrapper = ulysses_class()(self, core_attention, batch_size=1, attn_head_count=text.num_attention_heads,
                                   attn_head_size=getattr(text, "head_dim", None) or
                                   text.hidden_size // text.num_attention_heads,
                                   kv_head_count=text.num_key_value_heads, num_hidden_layers=text.num_hidden_layers,
                                   process_group=self.group, seq_length_is_variable=True)

        def mask(*args, **kwargs):  # the wrapper ignores masks: none is built for a slice while armed
            return None if self.armed else sdpa_mask(*args, **kwargs)

        # the patches `attention_functions_registered` and `ulysses_any_batch_size_slices_only`
        register_attention(ULYSSES, lambda *args, **kwargs: wrapper(*args, **kwargs), mask)
        return {"text_config": ULYSSES, "vision_config": core}

    def install(self, language_model: torch.nn.Module, adapter) -> None:
        """The language model sees only this rank's slice of the sequence (while armed)."""

        def slice_inputs(kwargs: dict):
            if not self.armed:
                return None
            length = kwargs["inputs_embeds"].shape[1]
            start, end = self.bounds(length)
            kwargs = dict(kwargs, attention_mask=None)  # the wrapper attends by position ids, causally
            kwargs["position_ids"] = _slice_last(_full_positions(kwargs.get("position_ids"), kwargs["inputs_embeds"]),
                                                 start, end)
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, start:end]
            # the attention learns it runs on a slice from its own call's kwargs, not from the armed state: a
            # checkpointed layer is recomputed in the backward, after the forward's arming has ended
            kwargs[SLICED] = True
            return adapter.slice_per_token(kwargs, start, end)

        rewrite_forward_kwargs(language_model, slice_inputs)  # the patch `language_model_forward_kwargs`
        linear_attention.install(language_model, self)  # Gated DeltaNet layers: their own all-to-alls

    # -- per step ---------------------------------------------------------------------------------
    @contextmanager
    def arming(self):
        """Active for one forward (ForwardContext.armed)."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    def bounds(self, length: int) -> tuple[int, int]:
        if length % self.size:
            raise ValueError(f"sequence of {length} tokens does not split over --sequence_parallel {self.size} "
                             "(the collator pads to a multiple of it)")
        local = length // self.size
        return self.rank * local, (self.rank + 1) * local

    def local_rows(self, rows: LabelRows, length: int) -> LabelRows:
        """The label rows (flat batch x position indices over the whole sequence, next-token targets already
        shifted) that fall in this rank's slice, re-indexed into it."""
        start, end = self.bounds(length)
        batch, position = rows.rows // length, rows.rows % length
        keep = (position >= start) & (position < end)
        local = end - start
        return LabelRows(batch[keep] * local + position[keep] - start, rows.targets[keep])


class _AllToAll(torch.autograd.Function):
    """distributed.all_to_all with its gradient: the same exchange, back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return comm.all_to_all(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return comm.all_to_all(grad, ctx.group), None


def _exchange(chunks: torch.Tensor, group) -> torch.Tensor:
    """Chunk i (dim 0) to rank i, chunk i back from rank i. Without a group (the planner's one-process trace on
    fake tensors) a copy of the same shape stands in for the exchange."""
    return chunks.clone(memory_format=torch.contiguous_format) if group is None else _AllToAll.apply(chunks, group)


def sequence_to_heads(local: torch.Tensor, group) -> torch.Tensor:
    """(batch, this rank's L/N tokens, N, c): the channels of each rank's heads, grouped by rank -> (batch, L, c):
    this rank's channels over the whole sequence (the ranks' slices in order)."""
    batch, length, ranks, width = local.shape
    received = _exchange(local.permute(2, 0, 1, 3), group)  # (N, batch, L/N, c): chunk i from rank i
    return received.permute(1, 0, 2, 3).reshape(batch, ranks * length, width)


def heads_to_sequence(whole: torch.Tensor, group, ranks: int) -> torch.Tensor:
    """The inverse of sequence_to_heads: (batch, L, c) -> (batch, L/N, N, c)."""
    batch, length, width = whole.shape
    received = _exchange(whole.reshape(batch, ranks, length // ranks, width).permute(1, 0, 2, 3), group)
    return received.permute(1, 2, 0, 3)


def _full_positions(position_ids, inputs_embeds) -> torch.Tensor:
    """The position ids as every rank of the group needs them: given ones, a text row added in front of
    3-row mrope ids (the Ulysses wrapper gathers it to mask causally), or plain positions."""
    batch, length = inputs_embeds.shape[:2]
    text = torch.arange(length, device=inputs_embeds.device).expand(batch, length)
    if position_ids is None:
        return text
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return torch.cat([text[None], position_ids], dim=0)
    return position_ids


def _slice_last(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return tensor[..., start:end]
