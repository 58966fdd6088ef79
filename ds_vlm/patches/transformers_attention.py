"""Attention in transformers' models: our kernels registered under names of our own, what the language model's
forward is given while a training forward is armed, and the Qwen vision towers' route to the varlen kernel."""

from __future__ import annotations

from typing import Callable, Optional

from ds_vlm.patches import patch

REGISTERED = patch(
    "attention_functions_registered", library="transformers", versions="transformers 5.24.0",
    target="transformers' global AttentionInterface and AttentionMaskInterface: our attention functions and their "
           "mask functions added under our own names (ds_vlm_varlen, ds_vlm_flash_varlen_vision, ds_vlm_ulysses, "
           "the planner's ds_vlm_trace_ulysses); no existing name is replaced",
    reason="a model loaded with one of these names runs our kernels (parallel/attention.py: packed rows kept "
           "apart without an L x L mask; parallel/ulysses.py: the sequence-parallel all-to-alls). The mask "
           "functions make no mask while a training forward is armed (SampleBoundaries.active, "
           "SequenceParallel.armed: transformers passes them nothing of the forward's kwargs), else sdpa's",
    scope="when the run resolves its attention (resolve_attention, SequenceParallel.attn_implementation, the "
          "planner's trace); a registration stays for the process (names of our own, replaced when re-registered)")

FORWARD_KWARGS = patch(
    "language_model_forward_kwargs", library="torch, transformers", versions="torch 2.14.1, transformers 5.24.0",
    target="a forward pre-hook (with kwargs) on the language model that rewrites its forward's kwargs while a "
           "training forward is armed: a packed row's sample boundaries (cu_seq_lens_q/k, max_length_q/k, a "
           "stand-in all-ones mask: SampleBoundaries), this rank's slice of the inputs under sequence "
           "parallelism (SequenceParallel)",
    reason="the VLM's forward builds the language model's inputs (the image features merged into the "
           "embeddings, mrope positions) and offers no argument that reaches the language model's own forward; "
           "the vision tower must run on the whole sequence, without the boundaries. transformers passes these "
           "kwargs from the language model down to every attention call",
    scope="installed on the model by the setup step (Trainer.setup_model, the planner's trace); it does nothing "
          "unless armed (ForwardContext.armed, for one forward); for the model's life")

VISION_ROUTE = patch(
    "vision_tower_varlen_route", library="transformers", versions="transformers 5.24.0",
    target="the vision config's private `_attn_implementation_internal` set to ds_vlm_flash_varlen_vision after "
           "loading",
    reason="transformers hands a vision tower its images' boundaries (cu_seqlens) only when its implementation's "
           "name says flash, and otherwise loops over the images with three host reads in every vision block "
           "(72 device syncs a forward for Qwen3-VL-2B); setting the name through the public setter would check "
           "it and try to load a flash-attention kernel",
    scope="Adapter.prepare of the Qwen-VL families (model loading); for the model's life")


def register_attention(name: str, function: Callable, mask: Callable) -> None:
    """REGISTERED: `function` and its mask function under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, mask)


def attention_function(name: str) -> Callable:
    """The attention function transformers runs for `name` (its public mapping; not a patch)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def rewrite_forward_kwargs(module, rewrite: Callable[[dict], Optional[dict]]):
    """FORWARD_KWARGS: `module`'s forward runs with `rewrite(kwargs)` (None: unchanged); returns the handle."""

    def hook(_module, args, kwargs):
        new = rewrite(kwargs)
        return None if new is None else (args, new)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def route_vision_tower(vision_config, name: str) -> None:
    """VISION_ROUTE: the vision tower runs the attention registered as `name`."""
    vision_config._attn_implementation_internal = name
