"""Keeping packed samples apart in linear-attention layers: Qwen3.5's Gated DeltaNet.

Qwen3.5's language tower is hybrid: most layers are Gated DeltaNet (a causal depthwise conv1d over the q/k/v
channels, then a gated delta rule that carries a recurrent state along the sequence), every few layers a
full-attention one. In a packed row the conv window and the recurrent state must restart at every sample,
or a sample reads the one before it through the state, while the loss looks fine.

Both layer kinds get a packed row's boundaries from the same place: `attention.SampleBoundaries` hands the
language model `cu_seq_lens_q` (and the rest of the varlen kwargs) while armed, and transformers passes them
down to every layer. Full attention runs them on the varlen interface (attention.py). A linear-attention layer
gets them through the patch below, which then runs transformers' forward itself (`_bounded_forward`: the same
math, tested equal to it): the projections, the gated norm and the output projection once over the row, and
the conv and the delta rule on one of two paths:

- "varlen kernels": on CUDA, where transformers found FLA's `chunk_gated_delta_rule` (flash-linear-attention /
  fla-core) and causal-conv1d's `causal_conv1d_fn`: one call of each over the whole row, the conv given
  `seq_idx` (int32 [1, L], each token's sample: it restarts its window where that changes), the delta rule
  `cu_seqlens` (int32 [samples + 1], on the device). No host sync.
- "per sample": everywhere else (a CPU; a GPU without both packages): the conv and the delta rule on each
  sample in turn (the row split at the boundaries, each sample from a zero conv window and a zero state, the
  outputs concatenated): exactly the sample alone. Its cost: more, smaller calls for the same FLOPs
  (transformers' chunked delta rule pads each sample, not the row, to a multiple of its 64-token chunk), and on
  a GPU one host read of the boundaries per layer. Measured on this project's shared 2-core CPU (one Gated
  DeltaNet layer, hidden 256, 4 value heads of 64, forward + backward of a 2,048-token row, fp32, 1 thread, two
  runs): 0.6-0.9x the time of the same row run as one unbounded sequence for samples of 64-1,024 tokens
  (transformers' torch path writes its chunk outputs into one row-long tensor, which costs more on a long
  row), 1.7x for 128 samples of 16 tokens (each padded to 64).

Submodules run once a forward on both paths, however many samples a row holds: ZeRO-3 gathers a submodule's
weights at each call, and ranks whose rows hold different numbers of samples would otherwise run different
numbers of collectives and hang (seen with the layer's own forward run once per sample).

Neither path drops a boundary silently. If transformers resolved a kernel that this module did not find (or
the other way round), transformers' own wrapper raises on the boundaries it cannot honour ("can't keep packed
sequences apart without ..."); a boundary with a cache, or with more than one row, is refused here.

The patch, `SampleAwareLinearAttention`, is a subclass of each Gated DeltaNet class (its `__class__` swapped on
the language model's linear-attention layers by `install`, which `SampleBoundaries` calls, through the named
patch `gated_deltanet_sample_aware` in ds_vlm/patches/): parameter names,
the state dict and `isinstance` stay as they were, and without boundaries (generation, evaluation with padding)
the layer is transformers' own. Written for transformers 5.24.0 (`Qwen3_5GatedDeltaNet`,
`Qwen3_5MoeGatedDeltaNet`: their forward's math, and the module-level `causal_conv1d_fn` and
`torch_chunk_gated_delta_rule` through which transformers reaches the kernels it found), fla-core /
flash-linear-attention 0.6.0 and causal-conv1d 1.7.0.

Under sequence parallelism (--sequence_parallel N, parallel/ulysses.py) each rank holds 1/N of the sequence,
but the conv and the delta rule need whole sequences. The patch then runs the layer as transformers does,
around two all-to-alls of its own (full-attention layers keep DeepSpeed's Ulysses wrapper): the projections on
the rank's slice; q, k, v (the conv's channels), beta's and the decay's inputs of 1/N of the heads sent so that
each rank holds its heads over the whole sequence; the conv (its channels of the weight) and the delta rule
there, on either path above with the whole sequence's boundaries; their output sent back to the slice for the
gated norm and the output projection. Each all-to-all moves (2 d_k H_k + (d_v + 2) H_v) x L / N values (and
d_v H_v x L / N back) per rank and layer, as Ulysses' own moves q, k, v and the output.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Optional

import torch

from ds_vlm.patches.transformers_linear_attention import make_sample_aware

# The Gated DeltaNet classes whose forward this patch was written against (transformers 5.24.0).
PATCHED_CLASSES = ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet")
LINEAR_ATTENTION = "linear_attention"  # the value of `layer_types` for these layers
# The varlen kwargs SampleBoundaries adds; the per-sample path hands none of them down.
BOUNDARY_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")

VARLEN_KERNELS, PER_SAMPLE = "varlen kernels", "per sample"


def has_linear_attention(config) -> bool:
    """Whether a model config's language tower has linear-attention layers (Qwen3.5's `layer_types`)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LINEAR_ATTENTION in (getattr(text, "layer_types", None) or ())


@functools.lru_cache(maxsize=None)
def varlen_kernels_installed() -> bool:
    """Whether FLA's chunked gated delta rule and causal-conv1d's conv import here, as transformers looks for
    them (integrations/hub_kernels.py: the package, then the function at its internal path)."""
    try:
        fla = importlib.import_module("fla.ops.gated_delta_rule")
        conv = importlib.import_module("causal_conv1d")
    except Exception:  # not installed, or installed without the GPU stack it needs (Triton, CUDA)
        return False
    return hasattr(fla, "chunk_gated_delta_rule") and hasattr(conv, "causal_conv1d_fn")


def linear_attention_path(device: torch.device) -> str:
    """Which path a packed row takes on `device` (the module docstring says what each costs)."""
    return VARLEN_KERNELS if device.type == "cuda" and varlen_kernels_installed() else PER_SAMPLE


def sequence_index(cu_seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """causal-conv1d's `seq_idx`: int32 [1, length], each token's sample (tokens past the last boundary, if any,
    one more), built on the boundaries' device without reading them back."""
    positions = torch.arange(length, device=cu_seq_lens.device, dtype=cu_seq_lens.dtype)
    return torch.searchsorted(cu_seq_lens[1:].contiguous(), positions, right=True, out_int32=True)[None]


def segment_lengths(cu_seq_lens: torch.Tensor, length: int) -> list[int]:
    """The samples' lengths from their boundaries (one host read where they are on a GPU), empty ones dropped,
    and any tokens past the last boundary as one more segment."""
    bounds = cu_seq_lens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if bounds[-1] < length:
        lengths.append(length - bounds[-1])
    return lengths


class SampleAwareLinearAttention(torch.nn.Module):
    """The patch (see the module docstring): a Gated DeltaNet layer that honours a packed row's boundaries, and
    under sequence parallelism runs its conv and delta rule on whole sequences for its share of the heads. Only
    ever a base in front of a transformers Gated DeltaNet class (`install`)."""

    sequence_parallel = None  # --sequence_parallel's SequenceParallel (size, rank, group), set by install

    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
        from ds_vlm.parallel.ulysses import SLICED

        cu_seq_lens, sliced = kwargs.get("cu_seq_lens_q"), kwargs.pop(SLICED, False)
        kwargs = {k: v for k, v in kwargs.items() if k not in BOUNDARY_KWARGS}
        if sliced:
            if self.sequence_parallel is None:
                raise ValueError(f"{type(self).__name__} got a sequence slice but no sequence-parallel group")
            return self._bounded_forward(hidden_states, cu_seq_lens, self.sequence_parallel)
        if cu_seq_lens is None:  # transformers' own forward
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if cache is not None or hidden_states.shape[0] != 1:
            raise ValueError(f"{type(self).__name__}: sample boundaries come with one packed row and no cache; got "
                             f"{hidden_states.shape[0]} rows" + (" and a cache" if cache is not None else ""))
        if attention_mask is not None:  # a packed row has no padding: the stand-in mask is all ones
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        return self._bounded_forward(hidden_states, cu_seq_lens, None)

    def _bounded_forward(self, hidden_states: torch.Tensor, cu_seq_lens, sp) -> torch.Tensor:
        """transformers' forward (5.24) with the conv and the delta rule over the boundaries: the projections,
        the gated norm and the output projection once over the row, each submodule called once whatever the
        number of samples (ZeRO-3 gathers a submodule's weights per call: a count that differed between ranks
        would hang it). Under sequence parallelism (`sp`), around two all-to-alls: the projections on this
        rank's slice; q/k/v (the conv's channels), beta's and the decay's inputs of this rank's 1/N of the heads
        over the whole sequence (each rank's slices, in order) for the conv and the delta rule, with the whole
        sequence's boundaries; their output back to the slice for the norm and the output projection."""
        from ds_vlm.parallel.ulysses import heads_to_sequence, sequence_to_heads

        ranks = 1 if sp is None else sp.size
        batch, length, _ = hidden_states.shape
        q, k, v = self.in_proj_qkv(hidden_states).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        b, a = self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)
        if sp is not None:
            per_rank = [t.reshape(batch, length, ranks, -1) for t in (q, k, v, b, a)]
            widths = [t.shape[-1] for t in per_rank]
            q, k, v, b, a = sequence_to_heads(torch.cat(per_rank, dim=-1), sp.group).split(widths, dim=-1)
        core = self._delta_rule_on_heads(q, k, v, b, a, cu_seq_lens, 0 if sp is None else sp.rank)
        if sp is not None:  # (batch, L, this rank's value heads, d_v) -> this rank's tokens, all heads
            core = heads_to_sequence(core.flatten(2), sp.group, ranks)
        z = self.in_proj_z(hidden_states).reshape(-1, self.head_v_dim)
        return self.out_proj(self.norm(core.reshape(-1, self.head_v_dim), z).reshape(batch, length, -1))

    def _delta_rule_on_heads(self, q, k, v, b, a, cu_seq_lens, rank: int) -> torch.Tensor:
        """The conv and the delta rule of the heads given (rank `rank`'s share of them) over whole sequences, on
        the kernels transformers resolved: with boundaries FLA's varlen kernels, or one sample at a time."""
        modeling = sys.modules[next(c for c in type(self).__mro__ if c.__name__ in PATCHED_CLASSES).__module__]
        key_width, value_width = q.shape[-1], v.shape[-1]
        channels = torch.cat([torch.arange(rank * key_width, (rank + 1) * key_width) + offset for offset in
                              (0, self.key_dim)] + [torch.arange(rank * value_width, (rank + 1) * value_width)
                                                    + 2 * self.key_dim]).to(q.device)
        weight = self.conv1d.weight.squeeze(1)[channels]
        bias = None if self.conv1d.bias is None else self.conv1d.bias[channels]
        heads = slice(rank * b.shape[-1], (rank + 1) * b.shape[-1])
        beta = b.sigmoid()
        g = -self.A_log[heads].float().exp() * torch.nn.functional.softplus(a.float() + self.dt_bias[heads])

        def conv_and_rule(mixed, g, beta, conv_bounds=None, rule_bounds=None):
            mixed = modeling.causal_conv1d_fn(mixed.transpose(1, 2), weight, bias, activation=self.activation,
                                              **(conv_bounds or {})).transpose(1, 2)
            q, k, v = mixed.split([key_width, key_width, value_width], dim=-1)
            out, _ = modeling.torch_chunk_gated_delta_rule(
                q.unflatten(-1, (-1, self.head_k_dim)), k.unflatten(-1, (-1, self.head_k_dim)),
                v.unflatten(-1, (-1, self.head_v_dim)), g=g, beta=beta, initial_state=None, output_final_state=False,
                use_qk_l2norm_in_kernel=True, **(rule_bounds or {}))
            return out

        mixed = torch.cat([q, k, v], dim=-1)  # contiguous, channel-last once transposed (as causal-conv1d wants)
        if cu_seq_lens is None:
            return conv_and_rule(mixed, g, beta)
        if linear_attention_path(mixed.device) == VARLEN_KERNELS:
            cu_seq_lens = cu_seq_lens.to(mixed.device, torch.int32)
            return conv_and_rule(mixed, g, beta, {"seq_idx": sequence_index(cu_seq_lens, mixed.shape[1])},
                                 {"cu_seqlens": cu_seq_lens})
        lengths = segment_lengths(cu_seq_lens, mixed.shape[1])
        return torch.cat([conv_and_rule(*parts) for parts in
                          zip(*(torch.split(t, lengths, dim=1) for t in (mixed, g, beta)))], dim=1)


def linear_attention_layers(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's Gated DeltaNet layers, patched or not. Refuses a model whose config has
    linear-attention layers of a class this patch was not written for (it would run them unbounded)."""
    layers = [m for m in language_model.modules()
              if type(m).__name__ in PATCHED_CLASSES or isinstance(m, SampleAwareLinearAttention)]
    config = getattr(language_model, "config", None)
    expected = (getattr(config, "layer_types", None) or ()).count(LINEAR_ATTENTION) if config is not None else 0
    if expected > len(layers):
        found = sorted({type(m).__name__ for m in language_model.modules() if "linear" in type(m).__name__.lower()
                        or "deltanet" in type(m).__name__.lower()})
        raise ValueError(f"the language model has {expected} linear-attention layers but only {len(layers)} of a "
                         f"class ds-vlm keeps packed samples apart in ({', '.join(PATCHED_CLASSES)}); found "
                         f"{found or 'none'}: packing would leak across samples, train without --packing")
    return layers


def install(language_model: torch.nn.Module, sequence_parallel=None) -> int:
    """Swap every Gated DeltaNet layer of `language_model` to its SampleAware subclass (idempotent), and give
    them --sequence_parallel's SequenceParallel where there is one; returns how many layers there are."""
    layers = linear_attention_layers(language_model)
    for layer in layers:
        make_sample_aware(layer, SampleAwareLinearAttention)  # the patch `gated_deltanet_sample_aware`
        if sequence_parallel is not None:
            layer.sequence_parallel = sequence_parallel
    return len(layers)


def describe(device: Optional[torch.device] = None) -> str:
    """For the run's log: the path packed rows take in linear-attention layers on this machine."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = linear_attention_path(device)
    if path == VARLEN_KERNELS:
        return "linear attention: FLA chunk_gated_delta_rule + causal-conv1d with the samples' boundaries"
    return "linear attention: transformers' torch path, one sample at a time (FLA and causal-conv1d " + (
        "not both installed)" if device.type == "cuda" else "need a GPU)")
