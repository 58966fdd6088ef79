"""The planner's trace (memplan/trace.py): one micro-batch's forward and backward on fake tensors, run as the
real run decides."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

from ds_vlm.patches import attribute, patch

NOT_TRACING = patch(
    "masking_utils_not_tracing", library="transformers", versions="transformers 5.24.0",
    target="transformers.masking_utils.is_tracing answers False",
    reason="transformers builds a full L x L causal mask when it sees fake tensors (it takes them for a compile "
           "trace); the real run's sdpa gets is_causal and no mask. The host values are known in the trace, so "
           "it decides as the real run does, and the planner measures the run's memory, not a mask's",
    scope="the planner's trace_activations, around its one forward and backward")

GROUPED_MM_BF16_ONLY = patch(
    "moe_grouped_mm_on_fakes", library="transformers, torch", versions="transformers 5.24.0, torch 2.14.1",
    target="transformers.integrations.moe._can_use_grouped_mm (private) answers False unless the weight is bf16",
    reason="torch's grouped_mm runs fp32 on a real CPU but its meta function takes bf16 only, so a fp32 trace "
           "takes transformers' own fallback (registered for fake tensors; the same output buffers)",
    scope="the planner's trace_activations, around its one forward and backward")


@contextmanager
def fake_tensors_run_as_real() -> Iterator[None]:
    """NOT_TRACING and GROUPED_MM_BF16_ONLY for the block."""
    import torch
    from transformers import masking_utils
    from transformers.integrations import moe

    usable = moe._can_use_grouped_mm
    with ExitStack() as stack:
        stack.enter_context(attribute(masking_utils, "is_tracing", lambda tensor=None: False))
        stack.enter_context(attribute(moe, "_can_use_grouped_mm", lambda input, weight, offs:
                                      weight.dtype == torch.bfloat16 and usable(input, weight, offs)))
        yield
