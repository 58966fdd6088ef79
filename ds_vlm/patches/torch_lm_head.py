"""The LM head's call computing the label-row loss during a training forward (train/loss.py)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ds_vlm.patches import patch

HEAD_COMPUTES_LOSS = patch(
    "lm_head_computes_label_loss", library="torch, transformers, deepspeed",
    versions="torch 2.14.1, transformers 5.24.0, deepspeed 0.19.8",
    target="the `forward` of the model's LM head module (an instance attribute over nn.Linear.forward): its call "
           "takes the last hidden state and returns the summed cross-entropy over the micro-batch's label rows "
           "(a 0-d fp32 tensor, where the model's output has its logits)",
    reason="the loss needs the head's weight, which under ZeRO-3 is partitioned (and may be tied to the "
           "embeddings): only a call of the head module makes DeepSpeed gather it for the forward and again for "
           "the backward (its hook rides on the module's returned tensor). An explicit interface (the model's "
           "hidden states given to a loss that applies the weight itself, torchtune's skip_output_layer) would "
           "need that gathering redone by hand for the backward and the gradient's reduction. transformers' "
           "`logits_to_keep` selects positions per row, not (row, position) pairs, and still makes logits. "
           "The head never holds more than one chunk of logits this way (the loss on ~10% of the tokens, chunked)",
    scope="LabelLoss.armed (ForwardContext.armed, the planner's trace, the tests): installed for one forward, "
          "removed when it ends; unarmed (generation, evaluation with logits) the head is nn.Linear's own")


@contextmanager
def head_computes(head: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """HEAD_COMPUTES_LOSS: `head`'s calls run `forward(hidden)` inside the block."""
    own = vars(head).get("forward")  # an instance forward someone else set, restored after
    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
