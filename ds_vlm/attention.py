"""The attention kernel, and keeping attention inside each sample of a packed row.

A packed micro-batch is one row of several samples (`--packing`). Attention must never cross from one
sample into another:
- on a CPU (and wherever sdpa or eager attention runs), transformers builds a block-diagonal causal mask
  from the text position ids, which restart at 0 at every sample (the collator writes them);
- on CUDA, a varlen kernel takes the samples' boundaries (`cu_seq_lens`) instead of a mask: PyTorch's own
  `torch.nn.attention.varlen.varlen_attn` (registered here as the attention implementation
  "ds_vlm_varlen"), or flash-attention 2 where flash-attn is installed. `SampleBoundaries` hands the
  boundaries to the language model only, never to the vision tower (whose own attention runs per image).
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch

VARLEN = "ds_vlm_varlen"


def has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_attention(choice: str, packing: bool = False) -> str:
    """--attn_implementation -> the name transformers loads. `auto`: on CUDA, with --packing PyTorch's varlen
    kernel (else flash-attention 2 if installed, else sdpa with a block-diagonal mask), without packing
    flash-attention 2 if installed, else sdpa; on a CPU sdpa. An explicit choice whose package or device is
    missing is an error naming it."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    cuda = torch.cuda.is_available()
    if choice == "auto":
        if cuda and packing and has_torch_varlen():
            choice = "varlen"
        else:
            return "flash_attention_2" if has_flash and cuda else "sdpa"
    if choice == "flash_attention_2":
        if not has_flash:
            raise ValueError("--attn_implementation flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn, built for your CUDA); sdpa needs nothing")
        if not cuda:
            raise ValueError("--attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa here")
    if choice == "varlen":
        if not (cuda and has_torch_varlen()):
            raise ValueError("--attn_implementation varlen needs a CUDA GPU and a PyTorch with "
                             "torch.nn.attention.varlen (2.9 or later); use sdpa here")
        register_varlen()
        return VARLEN
    return choice


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, position_ids=None, **kwargs):
    """transformers' attention-function signature around `varlen_attn`: (1, heads, L, dim) in, (1, L, heads,
    dim) out. The sample boundaries come from `SampleBoundaries` (no host sync); a packed row without them
    (restarting position ids) gets them from its positions (a host sync, but never attention across samples).
    Anything else (generation, a padded batch, the vision tower) is plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None and query.shape[0] == 1 and query.shape[2] > 1 and position_ids is not None:
        starts = (position_ids.reshape(-1, position_ids.shape[-1])[0] == 0).nonzero().flatten()
        if starts.numel() > 1:
            cu_seq_lens_q = torch.cat([starts, starts.new_tensor([query.shape[2]])]).to(torch.int32)
            max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, heads, dim)
    causal = getattr(module, "is_causal", True)
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                      window_size=(-1, 0) if causal else (-1, -1), enable_gqa=k.shape[1] != q.shape[1])
    return out.unsqueeze(0), None


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """sdpa that keeps attention inside each sample of a packed row, from its restarting position ids (a
    block-diagonal causal mask, O(L^2)): the core attention under sequence parallelism on a CPU, where the
    mask transformers built for one rank's slice does not apply to the gathered sequence."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is not None and query.shape[2] > 1 and getattr(module, "is_causal", True):
        positions = position_ids.reshape(-1, position_ids.shape[-1])
        sample = (positions == 0).cumsum(-1)  # which sample each token belongs to, per row
        causal = torch.ones(query.shape[2], query.shape[2], dtype=torch.bool, device=query.device).tril()
        attention_mask = (sample[:, None, :, None] == sample[:, None, None, :]) & causal
    return sdpa_attention_forward(module, query, key, value, attention_mask, position_ids=position_ids, **kwargs)


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """The mask transformers builds for "ds_vlm_varlen": none for a packed or unpadded row (the kernel keeps
    attention inside each sample and causal), sdpa's padding mask for a padded batch."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


class SampleBoundaries:
    """While armed, the language model's forward gets the packed row's sample boundaries as the kwargs that
    flash-attention 2 and "ds_vlm_varlen" read (cu_seq_lens_q/k, max_length_q/k); the vision tower never
    sees them. Unarmed, nothing is added."""

    def __init__(self, language_model: torch.nn.Module):
        self._armed: dict | None = None
        language_model.register_forward_pre_hook(self._inject, with_kwargs=True)

    def _inject(self, module, args, kwargs):
        if self._armed is None:
            return None
        return args, {**kwargs, **self._armed}

    @contextmanager
    def armed(self, cu_seq_lens: torch.Tensor | None, max_length: int):
        if cu_seq_lens is None:
            yield
            return
        self._armed = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": max_length,
                       "max_length_k": max_length}
        try:
            yield
        finally:
            self._armed = None
