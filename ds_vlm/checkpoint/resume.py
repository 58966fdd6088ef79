"""Resume: which checkpoint, whether the run may resume from it exactly, its conversion to DeepSpeed's universal
format on another world size, and loading it into the engine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ds_vlm.checkpoint.meta import LATEST, MARKER, RunMeta, is_complete, read_meta
from ds_vlm.checkpoint.rng import set_rng_state
from ds_vlm.config import CheckpointConfig, ConfigError, default_of
from ds_vlm.runtime.distributed import store_barrier


def find_checkpoint(path: str) -> Optional[Path]:
    """A complete checkpoint from a checkpoint folder, a checkpoints/ root, or an output dir."""
    path = Path(path)
    if is_complete(path):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = sorted(p for p in root.glob("step_*") if is_complete(p))
    return complete[-1] if complete else None


# Settings whose change makes a resumed run differ from the uninterrupted one. (expert_parallel is not one: EP 2
# gives the losses of EP 1, and another EP size resumes through the universal format, resume_point)
EXACTNESS_KEYS = ("model", "train_data", "image_root", "seed", "max_length", "lr", "muon_lr", "warmup_ratio",
                  "min_lr_ratio", "max_tokens_per_batch", "packing")


def holds_autoep_layers(checkpoint: Path) -> bool:
    """The checkpoint was saved by a run whose MoE blocks were AutoEP's (DeepSpeed writes each expert's weights
    to its own layer_L_expert_E file then): it resumes only into AutoEP's layout (parallel/expert.py)."""
    return any(checkpoint.glob("layer_*_expert_*_model_states.pt"))


def expert_parallel_change(checkpoint: Path, saved: RunMeta, run: RunMeta) -> bool:
    """Whether resuming `checkpoint` changes the EP size (it then goes through the universal format, which
    reshards AutoEP's experts); refuses what cannot be converted."""
    before, now = saved.config.get("expert_parallel", 1), run.config["expert_parallel"]
    if now > 1 and not holds_autoep_layers(checkpoint):
        raise ConfigError(f"cannot resume {checkpoint} at --expert_parallel {now}: it was saved without expert "
                          "parallelism. Its experts are in transformers' fused layout (experts.gate_up_proj), "
                          "which DeepSpeed's universal checkpoint keeps by name (AutoEP's are experts.w1/w2/w3, "
                          "router.gate), and AutoEP's engine puts the experts in optimizer groups of their own that "
                          "DeepSpeed's universal loader pairs with the checkpoint's groups by position (they would "
                          "get no optimizer state; the LR schedule's state has the old group count). Resume it at "
                          "--expert_parallel 1, or start the EP run from its HF export")
    if before != now and saved.zero_stage == 0:
        raise ConfigError(f"cannot resume {checkpoint} at --expert_parallel {now} (saved at {before}): another EP "
                          "size needs DeepSpeed's universal format, which ZeRO stage 0 does not write; resume at "
                          f"--expert_parallel {before}")
    return before != now


def config_differences(saved: RunMeta, now: RunMeta) -> list[str]:
    """What makes the run `now` differ from the uninterrupted run that saved `saved`, one line each."""
    # a key the checkpoint's version did not have yet held its default
    before = {key: saved.config.get(key, default_of(key)) for key in EXACTNESS_KEYS}
    diffs = [f"{key}: checkpoint {before[key]!r}, now {now.config.get(key)!r}"
             for key in EXACTNESS_KEYS if before[key] != now.config.get(key)]
    if saved.global_batch != now.global_batch:
        diffs.append(f"global batch: checkpoint {saved.global_batch} (micro {saved.config['micro_batch_size']} x "
                     f"accum {saved.config['grad_accum']} x {saved.world_size} ranks), now {now.global_batch}")
    if saved.total_steps != now.total_steps:
        diffs.append(f"total steps (LR schedule): checkpoint {saved.total_steps}, now {now.total_steps}")
    if now.config["max_tokens_per_batch"] and saved.data_parallel_size != now.data_parallel_size:
        diffs.append(f"data-parallel size with token-budget batching: checkpoint {saved.data_parallel_size}, now "
                     f"{now.data_parallel_size} (micro-batches are dealt per data-parallel rank)")
    if saved.n_train_samples != now.n_train_samples:
        diffs.append(f"usable train samples: checkpoint {saved.n_train_samples}, now {now.n_train_samples}")
    return diffs


def resume_source(config: CheckpointConfig) -> Optional[Path]:
    """The complete checkpoint --resume points at (auto: the output dir's latest), or None."""
    if config.resume == "none":
        return None
    return find_checkpoint(config.output_dir if config.resume == "auto" else config.resume)


class ResumePoint(NamedTuple):
    checkpoint: Optional[Path]  # None: a fresh start
    universal: bool             # it needs the universal format (saved on another world size, ZeRO 1-3)


def resume_point(config: CheckpointConfig, run: RunMeta) -> ResumePoint:
    """The checkpoint to resume from, if any, once `run` (this run's meta) is found to continue it exactly (or
    --resume_ignore_config says to go on anyway)."""
    if config.resume == "none":
        return ResumePoint(None, False)
    found = resume_source(config)
    if found is None:
        if config.resume != "auto":
            raise ConfigError(f"--resume {config.resume}: no complete checkpoint there")
        return ResumePoint(None, False)
    saved = read_meta(found).run
    diffs = config_differences(saved, run)
    if diffs and not config.resume_ignore_config:
        raise ConfigError(f"cannot resume exactly from {found}; the run differs in:\n  " + "\n  ".join(diffs)
                          + "\npass --resume_ignore_config to resume anyway, or --resume none to start fresh")
    other_ep = expert_parallel_change(found, saved, run)
    return ResumePoint(found, (saved.world_size != run.world_size and saved.zero_stage >= 1) or other_ep)


def universal_dir(checkpoint: Path) -> Path:
    return checkpoint / "universal"


def ensure_universal(checkpoint: Path, long_timeout_s: float = 7200, phase=None) -> Path:
    """Rank 0 converts a ZeRO checkpoint to DeepSpeed's universal format (once); all ranks wait (through the store:
    a large model's conversion can outlast --dist_timeout_s). `phase` tells the watchdog (faults.Watchdog.phase)."""
    phase = phase or (lambda name: None)
    phase("convert")
    target = universal_dir(checkpoint)
    if dist.get_rank() == 0 and not (target / MARKER).is_file():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        staging = checkpoint / "universal.partial"
        shutil.rmtree(staging, ignore_errors=True)
        ds_to_universal(Namespace(input_folder=str(checkpoint), output_folder=str(staging), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True))  # ZeRO-1/2 files lack the version key (in memory only)
        shutil.copy(checkpoint / MARKER, staging / MARKER)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    store_barrier(f"rank 0 converting {checkpoint} to the universal format", long_timeout_s)
    phase(None)
    return target


def load(engine, checkpoint: Path, universal: bool, trained_only: bool = False) -> int:
    """Engine, optimizer and LR schedule from `checkpoint`; this rank's RNG states if it saved them. Returns the
    step it was saved at."""
    source = universal_dir(checkpoint) if universal else checkpoint
    try:
        path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=not trained_only)
    except ValueError as err:
        if "parameter groups" not in str(err):
            raise
        raise ConfigError(f"cannot resume from {checkpoint}: its optimizer holds a different number of parameter "
                          f"groups than this run's ({len(engine.optimizer.param_groups)}): the trained parts or "
                          "their learning rates and weight decay differ (--train_vision, --train_projector, "
                          "--lora_*, the per-part learning rates), or a ds-vlm before a734ee2 wrote it (one group "
                          "per part and weight decay; since, parts with the same learning rate and weight decay "
                          "share one). Resume with the same settings and version, or start fresh with "
                          "--resume none") from err
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {source}")
    rng_file = checkpoint / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file() and not universal:
        set_rng_state(torch.load(rng_file, weights_only=True))
    return read_meta(checkpoint).step
