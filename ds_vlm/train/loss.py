"""The training loss: next-token cross-entropy summed over label tokens, with logits only where labels are.

In SFT only the answers carry labels (~10% of the tokens of an image-captioning sample), so the LM head
runs on those rows only, in chunks: at most one chunk of `rows x vocab` logits (fp32 for the softmax)
exists at a time, in the forward and in the backward. The head is reached through the model's own
`lm_head` module call (`LabelLoss` makes that call compute the loss while armed, through the named patch
`lm_head_computes_label_loss` in ds_vlm/patches/; forward.py arms it), so under ZeRO-3 the (partitioned,
possibly tied) head weight is gathered by DeepSpeed's module hooks like any other.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ds_vlm.data.encode import target_positions
from ds_vlm.patches.torch_lm_head import head_computes

CHUNK_BYTES = 256 << 20  # fp32 logits of one chunk: 441 rows of Qwen's 151,936-token vocabulary


@dataclass
class LabelRows:
    """Where the loss is: flat (batch x position) indices of the hidden states that predict a label, and
    those labels. Built on the host from the collated labels, so the device never has to be asked."""

    rows: torch.Tensor      # long, (n,)
    targets: torch.Tensor   # long, (n,)

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> "LabelRows":
        rows = target_positions(labels).flatten().nonzero().squeeze(1)
        following = torch.roll(labels, -1, dims=1).flatten()  # position t predicts token t + 1
        return cls(rows, following[rows])

    def __len__(self) -> int:
        return int(self.rows.numel())

    def to(self, device) -> "LabelRows":
        """On the device, copied without blocking the host: from pinned memory on CUDA (a non-blocking copy from
        pageable memory is staged by the driver and waits)."""
        return LabelRows(to_device(self.rows, device), to_device(self.targets, device))


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without blocking the host: through pinned memory when the device is CUDA."""
    if torch.device(device).type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T + b, target_i) without ever holding more than one chunk of logits.

    The forward runs over chunks of rows and keeps each row's log-sum-exp (one float per row). The backward
    recomputes the logits over chunks of the vocabulary, all rows at a time, so each slice of the weight
    gradient is written exactly once (one matmul, as the plain head's backward does; no fp32 copy of the
    whole weight gradient) and only the small hidden-state gradient is accumulated, in fp32. The head
    matmul on label rows is a small share of a step, so recomputing it costs little.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_bytes):
        vocab = weight.shape[0]
        rows_per_chunk = max(1, chunk_bytes // (4 * vocab))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows_per_chunk):
            end = start + rows_per_chunk
            logits = F.linear(hidden[start:end], weight, bias).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            total += (lse[start:end] - logits.gather(1, targets[start:end, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_bytes = chunk_bytes
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        columns = max(1, ctx.chunk_bytes // (4 * max(1, n_rows)))
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty_like(bias) if need_bias else None
        for start in range(0, vocab, columns):
            end = min(vocab, start + columns)
            w = weight[start:end]
            logits = F.linear(hidden, w, None if bias is None else bias[start:end]).float()
            probs = logits.sub_(lse[:, None]).exp_()
            # minus one at each row's target, where the target falls in this slice (no host round trip)
            here = (targets >= start) & (targets < end)
            probs.scatter_add_(1, (targets - start).clamp(0, end - start - 1)[:, None], -here.float()[:, None])
            grad_logits = probs.mul_(grad_total).to(weight.dtype)
            if need_hidden:
                grad_hidden += grad_logits @ w
            if need_weight:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[start:end])
            if need_bias:
                torch.sum(grad_logits, 0, out=grad_bias[start:end])
            del logits, probs, grad_logits
        return (grad_hidden.to(hidden.dtype) if need_hidden else None, grad_weight, grad_bias, None, None)


# bytes per logit the plain path holds at its peak: the head's output (2 in bf16, 4 in fp32), its fp32 copy
# and log-softmax's saved fp32 output, with room for the gradient of the same size in the backward
_PLAIN_BYTES_PER_LOGIT = 12


def chunked_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    """The summed loss over label rows, never more than CHUNK_BYTES of logits at a time. Rows whose logits fit in
    one chunk (at most 176 of Qwen's 151,936-token vocabulary: short answers, small micro-batches, the tiny
    test models) take the plain autograd path: it holds no more than one chunk and does not recompute the
    logits in the backward (the same loss, tests/unit/test_loss.py)."""
    if _PLAIN_BYTES_PER_LOGIT * hidden.shape[0] * weight.shape[0] <= CHUNK_BYTES:
        return full_loss_sum(hidden, weight, bias, targets)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, CHUNK_BYTES)


def full_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    """The plain path (all label rows' logits at once, fp32): the reference the chunked loss is tested against."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


class _LigerLinearCrossEntropy(torch.autograd.Function):
    """liger-kernel's fused linear cross-entropy (its Triton forward, which computes the gradients as it goes),
    with fp32 accumulation of the weight gradient, and a backward of our own: liger's compares the incoming
    gradient with 1.0 on the host (`torch.equal`, a device sync per micro-batch), and ours never does (our
    loss is always scaled, so the multiply always runs anyway). liger's forward still reads its target
    count back once (`.item()`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        out = fused_linear_cross_entropy_forward(hidden, weight, targets, bias=bias, reduction="sum",
                                                 accum_dtype=torch.float32)
        loss, grad_hidden, grad_weight, grad_bias = out[0], out[-3], out[-2], out[-1]
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss.float()

    @staticmethod
    def backward(ctx, grad_total):
        grads = []
        for grad, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3]):
            grads.append(grad.mul_(grad_total).to(dtype) if needed and grad is not None else None)
        return (*grads, None)


def liger_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    """liger's fused loss; a micro-batch with no label rows (a dummy at an epoch's end, an evaluation's dummy, a
    sequence-parallel slice without answer tokens) takes the plain path instead, which gives 0 and zero
    gradients: liger 0.8.5 sizes its chunks from the row count and divides by 0 there (ZeroDivisionError in
    `cdiv`, before any kernel runs). The row count is a shape: no device read."""
    if targets.shape[0] == 0:
        return full_loss_sum(hidden, weight, bias, targets)
    return _LigerLinearCrossEntropy.apply(hidden, weight, bias, targets)


def check_loss_available(kind: str) -> None:
    """--loss liger needs liger-kernel and a CUDA device; say so before any model is loaded (the config has
    checked that `kind` is one of its values)."""
    if kind != "liger":
        return
    try:
        import liger_kernel  # noqa: F401
    except ImportError as err:
        raise ValueError("--loss liger needs the liger-kernel package (pip install liger-kernel); "
                         "--loss chunked is the same loss in plain PyTorch") from err
    if not torch.cuda.is_available():
        raise ValueError("--loss liger runs Triton kernels and needs a CUDA GPU; use --loss chunked on this machine")


LOSS_FUNCTIONS = {"chunked": chunked_loss_sum, "full": full_loss_sum, "liger": liger_loss_sum}


@dataclass
class HeadResult:
    computed: bool = False  # the armed head's call happened (and returned the loss)


class LabelLoss:
    """The model's LM head, able to compute the loss instead of logits.

    Armed with a micro-batch's label rows (`with label_loss.armed(rows) as head:` around the model's forward),
    the model's own `lm_head` call computes the summed cross-entropy over those rows (a 0-d fp32 tensor) and
    returns it in the place of the logits: `loss_from(head, output)` takes it from the model's output. The call
    stays inside the model's forward and the loss leaves through the model's output on purpose: DeepSpeed's
    module hooks then gather the head's (ZeRO-3 partitioned, possibly tied) weight for the forward, and again
    for the backward (its hook rides on the head's returned tensor), as for any other module. Unarmed, it is
    the plain head (generation, evaluation with logits).
    """

    def __init__(self, model: torch.nn.Module, kind: str = "chunked"):
        self.head = model.get_output_embeddings()
        if not isinstance(self.head, torch.nn.Linear):
            raise ValueError(f"the LM head is a {type(self.head).__name__}, not a Linear layer")
        self.loss_fn = LOSS_FUNCTIONS[kind]
        self._armed: Optional[tuple[LabelRows, HeadResult]] = None

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._armed is None:  # a second call within one armed forward: logits
            return type(self.head).forward(self.head, hidden)
        (label_rows, result), self._armed = self._armed, None
        rows = hidden.flatten(0, -2).index_select(0, label_rows.rows)
        result.computed = True
        return self.loss_fn(rows, self.head.weight, self.head.bias, label_rows.targets)

    @contextmanager
    def armed(self, label_rows: LabelRows) -> Iterator[HeadResult]:
        """The head's call computes the loss inside the block (the patch `lm_head_computes_label_loss`)."""
        result = HeadResult()
        self._armed = (label_rows, result)
        try:
            with head_computes(self.head, self._forward):
                yield result
        finally:
            self._armed = None

    @staticmethod
    def loss_from(head: HeadResult, output) -> torch.Tensor:
        """The summed loss an armed forward's `output` carries where the logits would be."""
        if not head.computed:
            raise RuntimeError("the forward never reached the LM head: no loss")
        return output.logits

    def loss_of(self, call, inputs: dict, label_rows: LabelRows) -> torch.Tensor:
        """The summed loss of one forward, `call(**inputs)` (the model or the DeepSpeed engine), head armed."""
        with self.armed(label_rows) as head:
            output = call(**inputs)
        return self.loss_from(head, output)
