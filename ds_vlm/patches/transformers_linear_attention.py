"""Qwen3.5's Gated DeltaNet layers made to keep a packed row's samples apart (parallel/linear_attention.py)."""

from __future__ import annotations

import functools

from ds_vlm.patches import patch

SAMPLE_AWARE = patch(
    "gated_deltanet_sample_aware", library="transformers",
    versions="transformers 5.24.0 (Qwen3_5GatedDeltaNet, Qwen3_5MoeGatedDeltaNet), fla-core 0.6.0, causal-conv1d 1.7.0",
    target="the class of each Gated DeltaNet layer of the language model swapped to a subclass "
           "(SampleAwareLinearAttention in front of transformers' class) whose forward honours the packed row's "
           "boundaries (cu_seq_lens_q) and, under sequence parallelism, runs the conv and the delta rule on whole "
           "sequences for 1/N of the heads between two all-to-alls",
    reason="transformers' forward carries the conv window and the recurrent state across samples of a packed row "
           "(a sample reads the one before it, while the loss looks fine) and cannot run on a sequence slice. "
           "The subclass keeps parameter names, the state dict and isinstance; without boundaries or a slice it "
           "is transformers' own forward",
    scope="SampleBoundaries and SequenceParallel.install (setup of the model: --packing, --sequence_parallel); "
          "for the model's life (idempotent)")


@functools.lru_cache(maxsize=None)
def _subclass(patched: type, cls: type) -> type:
    return type(f"SampleAware{cls.__name__}", (patched, cls), {"__module__": patched.__module__})


def make_sample_aware(layer, patched: type) -> None:
    """SAMPLE_AWARE on one layer: its class becomes `patched` in front of its own class (unless it already is)."""
    if not isinstance(layer, patched):
        layer.__class__ = _subclass(patched, type(layer))
