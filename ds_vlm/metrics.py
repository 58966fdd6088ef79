"""What a run reports: metrics.jsonl (a line per logged step, and events), the progress bar, FLOPs and MFU,
reporters and the curves."""

from __future__ import annotations

import json
import math
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
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.bar.update(record["step"] - self.bar.n)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

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


def step_record(step: int, stats, seconds: float, lr: float, world_size: int, peak_tflops: float | None,
                skipped_steps: int) -> dict:
    """A step's metrics.jsonl line from its StepStats and how long it took."""
    tflops = stats.flops / seconds / world_size / 1e12
    return {"step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
            "tokens_per_s": stats.tokens / seconds, "samples_per_s": stats.samples / seconds, "step_time_s": seconds,
            "tokens": stats.tokens, "targets": stats.targets,
            "padding_efficiency": stats.tokens / max(1, stats.computed),
            "tflops_per_gpu": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
            "peak_mem_gb": stats.peak_mem_gb, "peak_reserved_gb": stats.peak_reserved_gb, "skipped": stats.skipped,
            "skipped_steps": skipped_steps}


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
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


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


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak RSS (VmHWM)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_memory_gb() -> tuple[float, float]:
    """(peak allocated, peak reserved) GPU memory since the last `reset_peak_memory`; on a CPU (peak RSS, 0)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9, 0.0
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 0.0  # KiB on Linux, since start


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


# --------------------------------------------------------------------------- curves


def plot_curves(metrics_file: str, out_png: str) -> None:
    """loss, learning rate and tokens/s against step, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    with open(metrics_file) as f:
        rows = [r for r in map(json.loads, f) if "event" not in r and "step" in r]
    last = {r["step"]: r for r in rows}  # a resumed run re-logs steps: keep the newest
    steps = sorted(last)
    panels = [("loss", "loss"), ("learning rate", "lr"), ("tokens/s", "tokens_per_s")]
    width, height, margin = 900, 260, 60
    image = Image.new("RGB", (width, height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    for n, (title, key) in enumerate(panels):
        top = n * height
        points = [(s, last[s][key]) for s in steps if isinstance(last[s].get(key), (int, float))
                  and math.isfinite(last[s][key])]
        box = (margin, top + 30, width - 20, top + height - 30)
        draw.rectangle(box, outline="black")
        draw.text((margin, top + 10), title, fill="black")
        if len(points) < 2:
            continue
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        hi = hi if hi > lo else lo + 1
        s0, s1 = points[0][0], points[-1][0]
        xy = [(box[0] + (s - s0) / max(1, s1 - s0) * (box[2] - box[0]),
               box[3] - (v - lo) / (hi - lo) * (box[3] - box[1])) for s, v in points]
        draw.line(xy, fill=(30, 80, 200), width=2)
        draw.text((5, box[1]), f"{hi:.3g}", fill="black")
        draw.text((5, box[3] - 10), f"{lo:.3g}", fill="black")
        draw.text((box[0], box[3] + 5), f"step {s0}", fill="black")
        draw.text((box[2] - 70, box[3] + 5), f"step {s1}", fill="black")
    image.save(out_png)
