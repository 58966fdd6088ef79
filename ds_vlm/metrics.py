"""What a run reports: metrics.jsonl (a line per logged step, and events), the progress bar, FLOPs and MFU,
reporters and the curves."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ModelConfig


class RunLog:
    """metrics.jsonl and the progress bar, written by rank 0; other ranks hold a RunLog that does nothing."""

    def __init__(self, output_dir: str, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.bar = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)

    def start_progress(self, total_steps: int, start_step: int) -> None:
        """A tqdm bar on a terminal; elsewhere (CI, nohup, SLURM logs) a line every 5% of the run instead of a
        bar redrawn into the file."""
        if not self.enabled:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)
        else:
            self.bar = LineProgress(total_steps, start_step, every=max(1, total_steps // 20))

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(record["step"] - self.bar.n)

    def event(self, record: dict) -> None:
        """A non-step line (eval, save, skipped records) in the same file."""
        if self.enabled:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def info(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


class LineProgress:
    """The progress bar's interface (update, set_postfix, write, close) as one line every `every` steps, and at
    the last one: `train: step 40/200 (20%), loss=0.1234, lr=1.20e-05, tok_s=3400, 0:01:23 elapsed, eta
    0:05:32`."""

    def __init__(self, total: int, initial: int, every: int):
        self.total, self.n, self.every, self.start, self.first = total, initial, every, time.perf_counter(), initial
        self.postfix: dict = {}

    def update(self, steps: int) -> None:
        self.n += steps
        if steps and (self.n % self.every == 0 or self.n == self.total):
            elapsed = time.perf_counter() - self.start
            done = max(1, self.n - self.first)
            eta = elapsed / done * (self.total - self.n)
            fields = "".join(f", {k}={v}" for k, v in self.postfix.items())
            print(f"train: step {self.n}/{self.total} ({self.n / max(1, self.total):.0%}){fields}, "
                  f"{_clock(elapsed)} elapsed, eta {_clock(eta)}", file=sys.stderr, flush=True)

    def set_postfix(self, refresh: bool = False, **fields) -> None:
        self.postfix = fields

    @staticmethod
    def write(text: str, file=None) -> None:
        print(text, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_record(step: int, stats, seconds: float, lr: float, world_size: int, peak_tflops: float | None,
                skipped_steps: int) -> dict:
    """A step's metrics.jsonl line from its StepStats and how long it took."""
    tflops = stats.flops / seconds / world_size / 1e12
    aux = {} if stats.router_aux_loss is None else {"router_aux_loss": stats.router_aux_loss}
    return {"step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
            "tokens_per_s": stats.tokens / seconds, "samples_per_s": stats.samples / seconds, "step_time_s": seconds,
            "tokens": stats.tokens, "targets": stats.targets,
            "padding_efficiency": stats.tokens / max(1, stats.computed),
            "tflops_per_gpu": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
            "peak_mem_gb": stats.peak_mem_gb, "peak_reserved_gb": stats.peak_reserved_gb,
            "peak_tensor_gb": stats.peak_tensor_gb, "skipped": stats.skipped,
            "skipped_steps": skipped_steps, **aux}


# --------------------------------------------------------------------------- FLOPs and MFU

# Dense bf16 peak TFLOP/s per GPU, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "L40": 181.0, "A6000": 155.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0, "V100": 125.0}


def device_peak_tflops(configured: float) -> float | None:
    """--peak_tflops if given, else the table's value for this GPU; None on CPU or an unknown GPU."""
    import torch

    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    return peak_tflops_of(torch.cuda.get_device_name())


def peak_tflops_of(name: str) -> float | None:
    """The table's bf16 peak for a GPU named `name` (its device name, or the planner's --gpu), or None."""
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name.upper()), None)


def _numel(*modules, skip=()) -> int:
    """Parameters of the modules, each shared tensor once (ZeRO-3 partitioned ones by their full size), except
    those of the `skip` modules."""
    skipped = {id(p) for m in skip for p in m.parameters()}
    unique = {id(p): p for m in modules if m is not None for p in m.parameters() if id(p) not in skipped}
    return sum(getattr(p, "ds_numel", p.numel()) for p in unique.values())


class FlopsCounter:
    """Model FLOPs of a training step from the config and the batch shapes (no recomputation counted).

    Per token of the language tower: 2 x (its non-embedding, non-head parameters) for the matmuls plus
    4 x layers x attention width x its sample's length for QK^T and AV (padding and other samples of a packed
    row are not attended to, so they count nothing); the LM head, 2 x its parameters per
    label row only (the loss computes logits nowhere else); per vision patch the same with the vision
    tower's depth and the patches of its image. A trained part costs 3 forwards (forward, input grads,
    weight grads); a frozen one that gradients pass through costs 2; a frozen one at the input costs 1.
    """

    def __init__(self, model, adapter, config: ModelConfig):
        text = model.config.get_text_config()
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        parts = adapter.parts(model)
        self.adapter, self.model_config = adapter, model.config
        self.n_llm = _numel(*parts.llm, skip=(embed, head))  # the embedding is a lookup, not a matmul
        self.n_head = _numel(head)
        self.n_vision = _numel(*parts.vision)
        self.n_projector = _numel(*parts.projector)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.text_layers, self.text_width = text.num_hidden_layers, text.num_attention_heads * head_dim
        self.vision_layers, self.vision_width = adapter.vision_depth_width(model.config)
        vision_trained = config.vision_blocks_to_train is not None
        self.mult_vision = 3 if vision_trained else 1
        self.mult_projector = 3 if config.train_projector else (2 if vision_trained else 1)
        self.mult_llm = 3 if config.train_llm else (2 if config.train_projector or vision_trained else 1)

    def __call__(self, batch: dict, n_label_rows: int, sample_lengths: list[int]) -> float:
        """FLOPs of one micro-batch: the language tower over the real tokens of each sample (`sample_lengths`:
        a packed row's samples, or each padded row's unpadded length), attention within each sample only, so
        a packed row and the same samples padded count alike."""
        tokens = sum(sample_lengths)
        text = (2 * self.n_llm * tokens + 2 * self.n_head * n_label_rows
                + 4 * self.text_layers * self.text_width * sum(n * n for n in sample_lengths))
        patches_per_image = self.adapter.patches_per_image(batch, self.model_config)
        n_patches = sum(patches_per_image)
        vision = 2 * self.n_vision * n_patches + 4 * self.vision_layers * self.vision_width * sum(
            p * p for p in patches_per_image)
        return (self.mult_llm * text + self.mult_vision * vision
                + self.mult_projector * 2 * self.n_projector * n_patches)


# --------------------------------------------------------------------------- reporters


class Reporter:
    """--report_to tensorboard|wandb on rank 0, each only if its package is installed."""

    def __init__(self, kind: str, output_dir: str, run_config: dict):
        self.kind, self.writer = kind, None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("--report_to tensorboard needs the tensorboard package: "
                                   "pip install tensorboard") from err
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError as err:
                raise RuntimeError("--report_to wandb needs the wandb package: pip install wandb") from err
            self.writer = wandb.init(project=os.environ.get("WANDB_PROJECT", "ds-vlm"), config=run_config,
                                     dir=output_dir)

    def log(self, step: int, values: dict) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.kind == "tensorboard":
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
        elif self.kind == "wandb":
            self.writer.log(numbers, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.writer.finish()
