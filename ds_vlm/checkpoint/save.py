"""Checkpoints you can trust: atomic saves (the layout: checkpoint/meta.py).

A save writes everything into step_N.partial, all ranks agree it succeeded, then rank 0
writes the marker, renames the folder to step_N and swaps `latest`. A kill -9 at any
moment leaves the previous complete checkpoint and a `latest` that points at one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ds_vlm.checkpoint.meta import HF_CONFIG, LATEST, MARKER, CheckpointMeta, RunMeta, is_complete, tag
from ds_vlm.checkpoint.rng import rng_state
from ds_vlm.runtime.distributed import all_ok, barrier, store_barrier


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and finds checkpoints of one run; every method is called on all ranks."""

    def __init__(self, output_dir: str, keep: int = 0, trained_only: bool = False, long_timeout_s: float = 7200):
        self.root = Path(output_dir) / "checkpoints"
        self.long_timeout_s = long_timeout_s  # how long the ranks wait for each other's writing (the store, not NCCL)
        self.keep = keep
        self.trained_only = trained_only  # LoRA: the frozen base weights come from --model, not the checkpoint
        self.rank = dist.get_rank()

    def path(self, step: int) -> Path:
        return self.root / tag(step)

    def save(self, engine, step: int, meta: RunMeta, processor) -> tuple[bool, str]:
        """Returns (ok, error). On failure the partial folder is removed; earlier checkpoints are untouched."""
        final, partial = self.path(step), self.root / (tag(step) + ".partial")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        error = ""
        try:
            engine.save_checkpoint(str(self.root), tag=partial.name, client_state={"ds_vlm_step": step},
                                   save_latest=False, exclude_frozen_parameters=self.trained_only)
            torch.save(rng_state(), partial / f"rng_rank{self.rank:05d}.pt")
        except Exception as err:  # disk full, quota, I/O errors: report, keep earlier checkpoints
            error = f"rank {self.rank}: {type(err).__name__}: {err}"
        # writing may outlast --dist_timeout_s (a large model on a slow disk): wait for it through the store, so
        # that the collectives below start only when every rank is there
        store_barrier(f"writing checkpoint step {step}", self.long_timeout_s)
        agreed = all_ok(not error)
        if agreed and self.rank == 0:
            try:
                engine.module.config.save_pretrained(partial / HF_CONFIG)
                if getattr(engine.module, "generation_config", None) is not None:
                    engine.module.generation_config.save_pretrained(partial / HF_CONFIG)
                processor.save_pretrained(partial / HF_CONFIG)
                write_atomic(partial / MARKER, json.dumps(CheckpointMeta(meta, step, time.time()).to_json(), indent=2))
                if final.exists():  # a re-save of the same step after a resume
                    shutil.rmtree(final)
                os.replace(partial, final)
                fsync_dir(self.root)
                write_atomic(self.root / LATEST, final.name)
            except Exception as err:
                error = f"rank 0: {type(err).__name__}: {err}"
        store_barrier(f"rank 0 completing checkpoint step {step}", self.long_timeout_s)
        ok = all_ok(agreed and not error, src_rank_decides=True)
        if not ok:
            error = error or "another rank failed to write its part"
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
        elif self.keep and self.rank == 0:
            self._prune()
        store_barrier("rank 0 pruning old checkpoints", self.long_timeout_s)
        return ok, error

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if is_complete(p))
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
