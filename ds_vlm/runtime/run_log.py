"""What a run reports: metrics.jsonl (a `StepRecord` line per logged step, and events), the progress bar (or
lines off a terminal), run_config.json, and the --report_to reporters. (curves.py draws curves.png from
metrics.jsonl; `RunLog.draw_curves` asks it to.)"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StepRecord:
    """A logged step's line in metrics.jsonl: its keys in this order (after `time`), `router_aux_loss` only where
    the step has one."""

    step: int
    loss: float                       # token-level mean over the global batch (nan: no label token)
    lr: float                         # the language tower's
    grad_norm: Optional[float]
    tokens_per_s: float
    samples_per_s: float
    step_time_s: float
    tokens: int
    targets: int
    padding_efficiency: float         # real tokens / tokens computed over
    tflops_per_gpu: float
    mfu: Optional[float]              # None where the GPU's peak is not known
    peak_mem_gb: list[float]          # per rank
    peak_reserved_gb: Optional[list[float]]
    peak_tensor_gb: Optional[list[float]]
    skipped: bool
    skipped_steps: int
    router_aux_loss: Optional[float] = None

    @classmethod
    def of(cls, step: int, stats, seconds: float, lr: float, world_size: int, peak_tflops: float | None,
           skipped_steps: int) -> StepRecord:
        """A step's line from its StepStats (train/step.py) and how long it took."""
        tflops = stats.flops / seconds / world_size / 1e12
        return cls(step=step, loss=stats.loss, lr=lr, grad_norm=stats.grad_norm, tokens_per_s=stats.tokens / seconds,
                   samples_per_s=stats.samples / seconds, step_time_s=seconds, tokens=stats.tokens,
                   targets=stats.targets, padding_efficiency=stats.tokens / max(1, stats.computed),
                   tflops_per_gpu=tflops, mfu=tflops / peak_tflops if peak_tflops else None,
                   peak_mem_gb=stats.peak_mem_gb, peak_reserved_gb=stats.peak_reserved_gb,
                   peak_tensor_gb=stats.peak_tensor_gb, skipped=stats.skipped, skipped_steps=skipped_steps,
                   router_aux_loss=stats.router_aux_loss)

    def to_json(self) -> dict:
        line = dataclasses.asdict(self)
        if self.router_aux_loss is None:
            del line["router_aux_loss"]
        return line


class RunLog:
    """The output folder's reports (metrics.jsonl, the progress bar, run_config.json, curves.png), written by
    rank 0; other ranks hold a RunLog that does nothing."""

    def __init__(self, output_dir: str, enabled: bool):
        self.output_dir, self.enabled = output_dir, enabled
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

    def step(self, record: StepRecord) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"time": round(time.time(), 3), **record.to_json()}) + "\n")
        self.bar.set_postfix(loss=f"{record.loss:.4f}", lr=f"{record.lr:.2e}", tok_s=f"{record.tokens_per_s:.0f}",
                             refresh=False)
        self.bar.update(record.step - self.bar.n)

    def event(self, record: dict) -> None:
        """A non-step line (eval, save, skipped records) in the same file."""
        if self.enabled:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def info(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

    def write_json(self, name: str, value: dict) -> None:
        """A json file in the output folder (run_config.json)."""
        if self.enabled:
            with open(os.path.join(self.output_dir, name), "w") as f:
                json.dump(value, f, indent=2)

    def draw_curves(self) -> None:
        """curves.png from metrics.jsonl as far as it is written."""
        if self.enabled:
            from ds_vlm.runtime.curves import plot_curves

            plot_curves(os.path.join(self.output_dir, "metrics.jsonl"), os.path.join(self.output_dir, "curves.png"),
                        title=os.path.basename(os.path.abspath(self.output_dir)))

    def close(self) -> None:
        """Idempotent: a run that raises closes its log on the way out, whether or not it was closed."""
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        self.bar = self.file = None


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
