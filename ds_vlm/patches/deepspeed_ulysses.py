"""DeepSpeed's Ulysses attention wrapper as the VLM's sequence parallelism runs it (parallel/ulysses.py)."""

from __future__ import annotations

import functools

from ds_vlm.patches import patch

SLICED = "ds_vlm_sequence_slice"  # the kwarg the language model passes down to its attention calls on a slice

ANY_BATCH_SIZE = patch(
    "ulysses_any_batch_size_slices_only", library="deepspeed", versions="deepspeed 0.19.8",
    target="a subclass of deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF whose forward "
           "rewrites the wrapper's internal expected shapes (batch_size, required_query_shape, "
           "required_key_value_shape, required_context_shape) to each call's batch size, and runs the core "
           "attention without the all-to-alls on a call that is not on a slice",
    reason="DeepSpeed's wrapper checks every call against the batch size it was built for, but a token budget "
           "or the end of an epoch changes it; generation runs whole sequences through the same layers. The "
           "wrapper offers no setter for these shapes",
    scope="SequenceParallel.attn_implementation builds it (--sequence_parallel > 1), registered under its own "
          "attention name for the text model only; for the process")


@functools.lru_cache(maxsize=None)
def ulysses_class():
    """DeepSpeed's wrapper, active only on a slice (its call's kwargs say so), for any batch size. Built on first
    use: importing DeepSpeed's Ulysses module costs."""
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    class VLMUlysses(UlyssesSPAttentionHF):
        def __init__(self, sp, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sp = sp

        def forward(self, module, query, key, value, attention_mask, *args, **kwargs):
            if not kwargs.pop(SLICED, False):  # a whole sequence (generation): no all-to-all
                return self.attn(module, query, key, value, attention_mask, *args, **kwargs)
            if query.shape[0] != self.batch_size:
                b = self.batch_size = query.shape[0]
                self.required_query_shape = torch.Size([1, b, self.attn_head_count, self.attn_head_size])
                self.required_key_value_shape = torch.Size([1, b, self.global_kv_head_count, self.attn_head_size])
                self.required_context_shape = torch.Size([1, b, self.attn_head_size * self.attn_head_count
                                                          // self.world_size])
            return super().forward(module, query, key, value, None, *args, **kwargs)

    return VLMUlysses
