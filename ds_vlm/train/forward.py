"""The training forward, and everything that makes it differ from the model's plain forward, armed in one
place for exactly as long as one forward runs:

- the LM head computes the summed loss on the micro-batch's label rows (loss.LabelLoss), not logits;
- a packed row's sample boundaries go to the language model's attention (attention.SampleBoundaries);
- under sequence parallelism the language model sees only this rank's slice of the sequence
  (parallel.ulysses.SequenceParallel).

Unarmed (generation, evaluation that wants logits), the model is the plain Hugging Face model.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ds_vlm.data.batching import MicroBatch
from ds_vlm.parallel.attention import SampleBoundaries
from ds_vlm.train.loss import HeadResult, LabelLoss, LabelRows


@dataclass
class ArmedForward:
    inputs: dict[str, torch.Tensor]  # the micro-batch's tensors on the device: what to call the model with
    head: HeadResult

    router_aux_coef: float = 0.0

    def loss(self, output) -> torch.Tensor:
        """The summed loss on the label rows, from the model's output (the armed LM head put it there)."""
        return LabelLoss.loss_from(self.head, output)

    def router_aux(self, output, n_rows: int) -> Optional[torch.Tensor]:
        """The MoE router's auxiliary loss of this forward times `n_rows` (its label rows), fp32; None where the
        config asks for none (Adapter.router_aux_loss_coef)."""
        if not self.router_aux_coef:
            return None
        aux = getattr(output, "aux_loss", None)
        if not isinstance(aux, torch.Tensor):
            raise RuntimeError("the model config asks for the router's auxiliary loss (output_router_logits, "
                               "router_aux_loss_coef) but the forward returned none")
        return aux.float() * n_rows


class ForwardContext:
    def __init__(self, loss: LabelLoss, device: torch.device, dtype: torch.dtype,
                 boundaries: Optional[SampleBoundaries] = None, sequence_parallel=None, router_aux_coef: float = 0.0):
        """`router_aux_coef`: the MoE router's auxiliary loss joins the training loss with this weight (0: not)."""
        self.loss, self.device, self.dtype = loss, device, dtype
        self.boundaries, self.sp = boundaries, sequence_parallel
        self.router_aux_coef = router_aux_coef

    def to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors to the device (from pinned memory, without waiting); the pixels in the model's dtype, every
        other tensor as it is (Qwen's `second_per_grid_ts` are times in seconds: bf16 would round them)."""
        return {k: v.to(self.device, self.dtype, non_blocking=True) if k.startswith("pixel_values")
                else v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    @contextmanager
    def armed(self, micro: MicroBatch, rows: LabelRows) -> Iterator[ArmedForward]:
        """`rows`: this rank's label rows of `micro` (under sequence parallelism, those of its slice)."""
        with ExitStack() as stack:
            head = stack.enter_context(self.loss.armed(rows.to(self.device)))
            if micro.cu_seq_lens is not None and self.boundaries is not None:
                stack.enter_context(self.boundaries.armed(micro.cu_seq_lens.to(self.device, non_blocking=True),
                                                          micro.max_length))
            if self.sp is not None:
                stack.enter_context(self.sp.arming())
            yield ArmedForward(self.to_device(micro.inputs), head, self.router_aux_coef)
