"""A checkpoint folder's layout, and its marker: what a checkpoint records of its run (`RunMeta`).

Layout under OUTPUT_DIR/checkpoints/:
    step_00000040/            a complete checkpoint (DeepSpeed files + ours)
        ds_vlm_checkpoint.json   written last: the run's meta, the step, the time. No marker, no checkpoint.
        rng_rank00000.pt         every rank's RNG states
        hf_config/               model config + processor files (for offline export)
    step_00000060.partial/    a save in progress (or killed mid-way): ignored, removed by the next save
    latest                    the tag of the newest complete checkpoint (DeepSpeed's format), replaced atomically
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MARKER = "ds_vlm_checkpoint.json"
HF_CONFIG = "hf_config"
LATEST = "latest"


def tag(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunMeta:
    """What a checkpoint records of its run, and what a resume compares with the run resuming: the marker's keys
    (in this order; `step` and `time` follow them)."""

    world_size: int
    data_parallel_size: int
    sequence_parallel: int
    zero_stage: int
    global_batch: int
    lora: Optional[dict]           # models.lora.describe of the adapter; None: full fine-tuning
    total_steps: int
    n_train_samples: Optional[int]
    config: dict                   # the run's flat keys (TrainConfig.to_keys)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: dict) -> RunMeta:
        """A marker's run meta. Markers written before 06eab3b (2026-11-29) lack the data-parallel size (then
        the world size), the sequence-parallel size (1) and the LoRA description (full fine-tuning)."""
        return cls(world_size=saved["world_size"],
                   data_parallel_size=saved.get("data_parallel_size", saved["world_size"]),
                   sequence_parallel=saved.get("sequence_parallel", 1), zero_stage=saved["zero_stage"],
                   global_batch=saved["global_batch"], lora=saved.get("lora"), total_steps=saved["total_steps"],
                   n_train_samples=saved.get("n_train_samples"), config=saved["config"])


@dataclass(frozen=True)
class CheckpointMeta:
    """A complete checkpoint's marker."""

    run: RunMeta
    step: int
    time: float = 0.0

    def to_json(self) -> dict:
        return {**self.run.to_json(), "step": self.step, "time": self.time}

    @classmethod
    def from_json(cls, saved: dict) -> CheckpointMeta:
        return cls(RunMeta.from_json(saved), saved["step"], saved.get("time", 0.0))


def read_meta(checkpoint: Path) -> CheckpointMeta:
    with open(Path(checkpoint) / MARKER) as f:
        return CheckpointMeta.from_json(json.load(f))


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / MARKER).is_file() and not str(checkpoint).endswith(".partial")
