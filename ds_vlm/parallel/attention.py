"""The attention kernel, and keeping attention inside each sample of a packed row.

A packed micro-batch is one row of several samples (`--packing`). Attention must never cross from one
sample into another. Packed rows go through one varlen interface, whatever the machine: the collator knows
the samples' boundaries (`cu_seq_lens`) and the longest sample on the host, `SampleBoundaries` hands them to
the language model's attention (never to the vision tower, which finds its own per-image boundaries), and
the implementation registered as "ds_vlm_varlen" runs them on the best kernel there is:
- on CUDA, PyTorch's `torch.nn.attention.varlen.varlen_attn` (called as the installed torch's signature
  allows), or flash-attention 2 where flash-attn is installed (`auto` prefers it);
- on a CPU, sdpa sample by sample (the boundaries are host numbers there: no sync, and never an L x L mask).
The Qwen vision towers run the same function under a second name, "ds_vlm_flash_varlen_vision"
(`route_vision_varlen`): transformers hands a vision tower its images' boundaries (`cu_seqlens`) only when
its implementation's name says flash, and otherwise loops over the images with a host read per block. (The
language model's name cannot say flash: transformers would then try to load a flash-attention kernel.)
Anything unpacked (generation, eval with padding, a padded batch) runs plain sdpa with transformers' mask.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from contextlib import contextmanager
from typing import Optional

import torch

import ds_vlm.parallel.linear_attention as linear_attention
from ds_vlm.patches.transformers_attention import register_attention, rewrite_forward_kwargs, route_vision_tower
from ds_vlm.runtime.console import say_once

VARLEN = "ds_vlm_varlen"
VISION_VARLEN = "ds_vlm_flash_varlen_vision"


# flash-attention 2 and PyTorch's varlen kernel take half precision only, on Ampere (compute capability 8.0) and newer
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def has_flash_attn() -> bool:
    """flash-attn is installed AND loads: a wheel built for another torch or CUDA is found by name but fails at
    import (an undefined symbol in its extension); it is then not offered, with the reason said once."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        importlib.import_module("flash_attn.flash_attn_interface")
    except Exception as err:  # noqa: BLE001 - ImportError, OSError (undefined symbol), RuntimeError
        say_once(f"flash-attn is installed but does not load ({type(err).__name__}: {str(err)[:200]}); not used")
        return False
    return True


def flash_unusable(dtype: torch.dtype, capability: Optional[tuple[int, int]]) -> str:
    """Why the flash/varlen kernels cannot run a model of `dtype` on a GPU of `capability` ('' if they can)."""
    if dtype not in FLASH_DTYPES:
        return f"they take fp16/bf16 only and this run is {str(dtype).replace('torch.', '')}"
    if capability is not None and tuple(capability) < FLASH_MIN_CAPABILITY:
        return f"they need compute capability 8.0+ (Ampere) and this GPU is {capability[0]}.{capability[1]}"
    return ""


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _flash_runs(query: torch.Tensor) -> bool:
    """The varlen kernels take this call's tensors (CUDA, half precision, Ampere or newer)."""
    return query.device.type == "cuda" and not flash_unusable(query.dtype, _device_capability(query.device.index or 0))


@functools.lru_cache(maxsize=None)
def torch_varlen_signature() -> Optional[frozenset]:
    """The keyword parameters of this torch's `varlen_attn`, or None where it has none (torch < 2.9). 2.9-2.10
    take `is_causal`; later ones `window_size`, `scale` and `enable_gqa` (adapted in `_torch_varlen`)."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None
    from torch.nn.attention.varlen import varlen_attn

    params = frozenset(inspect.signature(varlen_attn).parameters)
    return params if {"window_size", "is_causal"} & params else None


def resolve_attention(choice: str, packing: bool = False, cuda: Optional[bool] = None,
                      dtype: torch.dtype = torch.bfloat16, capability: Optional[tuple[int, int]] = None) -> str:
    """--attn_implementation -> the name transformers loads, for a model of `dtype` on this machine's GPU
    (`capability`: its compute capability, read from the device when not given).

    auto: with --packing the varlen interface (on CUDA flash-attention 2 if installed, else PyTorch's varlen
    kernel, else sdpa with transformers' block-diagonal mask, said in one line; on a CPU, in fp32, or on a GPU
    older than Ampere the per-sample sdpa loop, said in one line); without packing sdpa (flash-attention 2 on a
    padded batch unpads with host reads in every layer; sdpa takes the mask as it is). varlen: the varlen
    interface. flash_attention_2 without its package, a GPU, half precision or Ampere is an error naming what is
    missing."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and capability is None:
        capability = _device_capability(torch.cuda.current_device())
    why_not = flash_unusable(dtype, capability) if cuda else "no CUDA GPU"
    flash = has_flash_attn() and not why_not
    if choice == "auto":
        if not packing:
            return "sdpa"
        choice = "flash_attention_2" if flash else "varlen"
    if choice == "flash_attention_2":
        if not has_flash_attn():
            raise ValueError("--attn_implementation flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn, built for your CUDA); sdpa needs nothing")
        if not cuda:
            raise ValueError("--attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa here")
        if why_not:
            raise ValueError(f"--attn_implementation flash_attention_2 cannot run here: {why_not}; use sdpa or varlen")
        return choice
    if choice == "varlen":
        if cuda and why_not:
            say_once(f"packed rows run sdpa sample by sample (one host read of the boundaries per layer): the varlen "
                     f"kernels cannot run here ({why_not})")
        elif cuda and torch_varlen_signature() is None:
            fallback = "flash_attention_2" if flash else "sdpa"
            say_once(f"this torch ({torch.__version__}) has no torch.nn.attention.varlen kernel: packed rows run on "
                      f"{fallback}" + (" with a block-diagonal mask (O(L^2) memory)" if fallback == "sdpa" else ""))
            return fallback
        register_varlen()
        return VARLEN
    return choice


def kernel_description(implementation: str, cuda: Optional[bool] = None, dtype: torch.dtype = torch.bfloat16,
                       capability: Optional[tuple[int, int]] = None) -> str:
    """What actually runs for a resolved implementation name on this machine (for logs and the GPU check)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if implementation != VARLEN:
        return implementation
    if not cuda:
        return "varlen interface: per-sample sdpa on the CPU"
    if cuda and capability is None:
        capability = _device_capability(torch.cuda.current_device())
    why_not = flash_unusable(dtype, capability)
    if why_not:
        return f"varlen interface: per-sample sdpa ({why_not})"
    params = torch_varlen_signature() or frozenset()
    return f"varlen interface: torch varlen_attn ({'window_size' if 'window_size' in params else 'is_causal'})"


def _repeat_kv(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """(L, kv heads, dim) -> (L, kv heads x groups, dim), each kv head repeated for its query heads."""
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def _torch_varlen(q, k, v, cu_seq_lens, max_length: int, scale: Optional[float], causal: bool) -> torch.Tensor:
    """PyTorch's varlen kernel, called as this torch allows: (L, heads, dim) in and out."""
    from torch.nn.attention.varlen import varlen_attn

    params = torch_varlen_signature()
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6 * scale:
        raise ValueError(f"this torch's varlen_attn takes no scale; the model asks for {scale}, not 1/sqrt(dim)")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = (_repeat_kv(t, q.shape[1] // t.shape[1]) for t in (k, v))
    return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **kwargs)


def _per_sample_sdpa(query, key, value, cu_seq_lens, scale: Optional[float], causal: bool) -> torch.Tensor:
    """sdpa sample by sample (the CPU's varlen kernel): (1, heads, L, dim) in, (1, L, heads, dim) out, no mask
    anywhere (grouped-query heads through sdpa's own enable_gqa)."""
    bounds = cu_seq_lens.tolist()  # a CPU tensor: no device to wait for
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    gqa = key.shape[1] != query.shape[1]
    # split, not slices: split's backward is one concatenation, each slice's would be a zero-filled full copy
    outputs = [torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
               for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(outputs, dim=2).transpose(1, 2)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """transformers' attention-function signature around the varlen kernels: (1, heads, L, dim) in, (1, L, heads,
    dim) out. With sample boundaries (a packed row: `SampleBoundaries`; a Qwen vision tower: its images), each
    sample attends within itself (causally in the language model); without them, plain sdpa with the mask
    transformers made (generation, padded batches)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if not _flash_runs(query):  # a CPU; on CUDA fp32, or a GPU older than Ampere (one host read of the bounds)
        return _per_sample_sdpa(query, key, value, cu_seq_lens_q, scaling, causal), None
    if max_length_q is None:  # a caller that did not say: read it (one host sync)
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, heads, dim)
    return _torch_varlen(q, k, v, cu_seq_lens_q, max_length_q, scaling, causal).unsqueeze(0), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """The mask transformers builds for the varlen interface: none while sample boundaries are armed (they keep
    attention inside each sample; `SampleBoundaries` passes a stand-in mask so that transformers does not read
    the position ids back to find them), else sdpa's (a padded batch, generation, or a packed row run without
    its boundaries: then the block-diagonal mask from the positions, never attention across samples)."""
    from transformers.masking_utils import sdpa_mask

    if SampleBoundaries.active is not None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)  # packed samples found from the positions too


def register_varlen() -> None:
    """The varlen interface under its two names (the patch `attention_functions_registered`)."""
    for name in (VARLEN, VISION_VARLEN):
        register_attention(name, varlen_attention, _varlen_mask)


def route_vision_varlen(vision_config) -> bool:
    """A vision tower loaded with the varlen interface or sdpa, packed or not, gets the varlen interface under
    the name that makes transformers pass its images' boundaries (set after loading: the name is checked only
    then). Otherwise transformers' sdpa path loops over the images with three host reads in every vision block
    (72 device syncs a forward for Qwen3-VL-2B). The same numbers: each image attends within itself either way.
    True if it was changed."""
    if getattr(vision_config, "_attn_implementation", None) not in (VARLEN, "sdpa"):
        return False
    register_varlen()
    route_vision_tower(vision_config, VISION_VARLEN)  # the patch `vision_tower_varlen_route`
    return True


class SampleBoundaries:
    """While armed, the language model's forward gets the packed row's sample boundaries as the kwargs that
    flash-attention 2 and the varlen interface read (cu_seq_lens_q/k, max_length_q/k); the vision tower never
    sees them. Unarmed, nothing is added. The same kwargs reach the linear-attention layers of a hybrid tower
    (Qwen3.5's Gated DeltaNet), which honour them through the patch `linear_attention.install` puts on them here
    (FLA's varlen kernels on a GPU that has them, else one sample at a time). The kwargs reach the language model
    through the patch `language_model_forward_kwargs` (ds_vlm/patches/transformers_attention.py).

    With `stand_in_mask` (our own implementations, whose mask functions know the armed state: the varlen
    interface, the Ulysses wrapper): transformers would otherwise look for packed samples itself, by reading
    the position ids back from the device once per forward; an all-ones attention mask in their place stops
    that, and the mask function makes no mask while the boundaries are armed. Never for flash_attention_2,
    which would take the mask's unpadding path and ignore the boundaries."""

    # the armed instance, for the registered mask function (transformers passes it none of the forward's kwargs)
    active: Optional["SampleBoundaries"] = None

    def __init__(self, language_model: torch.nn.Module, stand_in_mask: bool = False):
        self._armed: dict | None = None
        self.stand_in_mask = stand_in_mask
        linear_attention.install(language_model)
        rewrite_forward_kwargs(language_model, self._inject)  # the patch `language_model_forward_kwargs`

    def _inject(self, kwargs: dict) -> Optional[dict]:
        if self._armed is None:
            return None
        embeds = kwargs.get("inputs_embeds")
        extra = dict(self._armed)
        if self.stand_in_mask and embeds is not None and kwargs.get("attention_mask") is None:
            extra["attention_mask"] = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return {**kwargs, **extra}

    @contextmanager
    def armed(self, cu_seq_lens: torch.Tensor | None, max_length: int):
        if cu_seq_lens is None:
            yield
            return
        self._armed = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": max_length,
                       "max_length_k": max_length}
        SampleBoundaries.active = self
        try:
            yield
        finally:
            self._armed = None
            SampleBoundaries.active = None
