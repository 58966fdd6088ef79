"""Checkpoints you can trust: atomic saves, exact resume, world-size changes, HF export.

Layout under OUTPUT_DIR/checkpoints/:
    step_00000040/            a complete checkpoint (DeepSpeed files + ours)
        ds_vlm_checkpoint.json   written last: step, world size, run config. No marker, no checkpoint.
        rng_rank00000.pt         every rank's RNG states
        hf_config/               model config + processor files (for offline export)
    step_00000060.partial/    a save in progress (or killed mid-way): ignored, removed by the next save
    latest                    the tag of the newest complete checkpoint (DeepSpeed's format), replaced atomically

A save writes everything into step_N.partial, all ranks agree it succeeded, then rank 0
writes the marker, renames the folder to step_N and swaps `latest`. A kill -9 at any
moment leaves the previous complete checkpoint and a `latest` that points at one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ds_vlm.config import CheckpointConfig, ConfigError, default_of
from ds_vlm.runtime.distributed import all_ok, barrier, store_barrier

MARKER = "ds_vlm_checkpoint.json"
HF_CONFIG = "hf_config"
LATEST = "latest"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_meta(checkpoint: Path) -> dict:
    with open(Path(checkpoint) / MARKER) as f:
        return json.load(f)


def is_complete(checkpoint: Path) -> bool:
    return (Path(checkpoint) / MARKER).is_file() and not str(checkpoint).endswith(".partial")


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


# --------------------------------------------------------------------------- rng


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators seeded (a run's start; a resume then loads their states)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached": cached}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save


class Checkpointer:
    """Saves and finds checkpoints of one run; every method is called on all ranks."""

    def __init__(self, output_dir: str, keep: int = 0, trained_only: bool = False, long_timeout_s: float = 7200):
        self.root = Path(output_dir) / "checkpoints"
        self.long_timeout_s = long_timeout_s  # how long the ranks wait for each other's writing (the store, not NCCL)
        self.keep = keep
        self.trained_only = trained_only  # LoRA: the frozen base weights come from --model, not the checkpoint
        self.rank = dist.get_rank()

    def save(self, engine, step: int, meta: dict, processor) -> tuple[bool, str]:
        """Returns (ok, error). On failure the partial folder is removed; earlier checkpoints are untouched."""
        final, partial = self.root / _tag(step), self.root / (_tag(step) + ".partial")
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
                _write_atomic(partial / MARKER, json.dumps({**meta, "step": step, "time": time.time()}, indent=2))
                if final.exists():  # a re-save of the same step after a resume
                    shutil.rmtree(final)
                os.replace(partial, final)
                _fsync_dir(self.root)
                _write_atomic(self.root / LATEST, final.name)
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


# --------------------------------------------------------------------------- resume


# Settings whose change makes a resumed run differ from the uninterrupted one.
# expert_parallel: an AutoEP checkpoint holds each rank's experts under AutoEP's names (across EP sizes the
# engine's load fails; not converted yet)
EXACTNESS_KEYS = ("model", "train_data", "image_root", "seed", "max_length", "lr", "muon_lr", "warmup_ratio",
                  "min_lr_ratio", "max_tokens_per_batch", "packing", "expert_parallel")


def config_differences(meta: dict, config: dict, global_batch: int, total_steps: int) -> list[str]:
    # a key the checkpoint's version did not have yet held its default
    saved = {key: meta["config"].get(key, default_of(key)) for key in EXACTNESS_KEYS}
    diffs = [f"{key}: checkpoint {saved[key]!r}, now {config.get(key)!r}"
             for key in EXACTNESS_KEYS if saved[key] != config.get(key)]
    if meta["global_batch"] != global_batch:
        diffs.append(f"global batch: checkpoint {meta['global_batch']} (micro {meta['config']['micro_batch_size']} x "
                     f"accum {meta['config']['grad_accum']} x {meta['world_size']} ranks), now {global_batch}")
    if meta["total_steps"] != total_steps:
        diffs.append(f"total steps (LR schedule): checkpoint {meta['total_steps']}, now {total_steps}")
    return diffs


def resume_source(config: CheckpointConfig) -> Optional[Path]:
    """The complete checkpoint --resume points at (auto: the output dir's latest), or None."""
    if config.resume == "none":
        return None
    return find_checkpoint(config.output_dir if config.resume == "auto" else config.resume)


def resume_point(config: CheckpointConfig, run_meta: dict):
    """(checkpoint to resume from or None, whether it needs the universal format). `run_meta["config"]` holds
    this run's flat keys, as checkpoints record them."""
    if config.resume == "none":
        return None, False
    found = resume_source(config)
    if found is None:
        if config.resume != "auto":
            raise ConfigError(f"--resume {config.resume}: no complete checkpoint there")
        return None, False
    meta = read_meta(found)
    diffs = config_differences(meta, run_meta["config"], run_meta["global_batch"], run_meta["total_steps"])
    saved_dp = meta.get("data_parallel_size", meta["world_size"])
    if run_meta["config"]["max_tokens_per_batch"] and saved_dp != run_meta["data_parallel_size"]:
        diffs.append(f"data-parallel size with token-budget batching: checkpoint {saved_dp}, now "
                     f"{run_meta['data_parallel_size']} (micro-batches are dealt per data-parallel rank)")
    if meta.get("n_train_samples") != run_meta["n_train_samples"]:
        diffs.append(f"usable train samples: checkpoint {meta.get('n_train_samples')}, now "
                     f"{run_meta['n_train_samples']}")
    if diffs and not config.resume_ignore_config:
        raise ConfigError(f"cannot resume exactly from {found}; the run differs in:\n  " + "\n  ".join(diffs)
                          + "\npass --resume_ignore_config to resume anyway, or --resume none to start fresh")
    universal = meta["world_size"] != run_meta["world_size"] and meta["zero_stage"] >= 1
    return found, universal


def universal_dir(checkpoint: Path) -> Path:
    return checkpoint / "universal"


def ensure_universal(checkpoint: Path, long_timeout_s: float = 7200) -> Path:
    """Rank 0 converts a ZeRO checkpoint to DeepSpeed's universal format (once); all ranks wait (through the store:
    a large model's conversion can outlast --dist_timeout_s)."""
    target = universal_dir(checkpoint)
    if dist.get_rank() == 0 and not (target / MARKER).is_file():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        staging = checkpoint / "universal.partial"
        shutil.rmtree(staging, ignore_errors=True)
        ds_to_universal(Namespace(input_folder=str(checkpoint), output_folder=str(staging), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False))
        shutil.copy(checkpoint / MARKER, staging / MARKER)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    store_barrier(f"rank 0 converting {checkpoint} to the universal format", long_timeout_s)
    return target


def load(engine, checkpoint: Path, universal: bool, trained_only: bool = False) -> None:
    """Engine, optimizer and LR schedule from `checkpoint`; this rank's RNG states if it saved them."""
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


# --------------------------------------------------------------------------- export


def gathered_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (None elsewhere); collective under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_hf(model, state: dict, processor, out_dir: str, max_shard_size: str = "5GB") -> None:
    """Write safetensors + config + processor into out_dir, via a staging folder renamed at the end."""
    staging = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    text_config = getattr(model.config, "text_config", model.config)
    use_cache = getattr(text_config, "use_cache", True)
    text_config.use_cache = True  # training turns the KV cache off; generation wants it
    try:
        # Module names are the canonical keys; reverting load-time renames mangled them under ZeRO-3.
        model.save_pretrained(staging, state_dict=state, safe_serialization=True, save_original_format=False,
                              max_shard_size=max_shard_size)
    finally:
        text_config.use_cache = use_cache
    processor.save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)


def plain_model(config, state: dict, generation_config=None):
    """A model of `config` whose parameters are `state`'s tensors (no copy), built on the meta device. While
    a ZeRO-3 run's HfDeepSpeedConfig is alive, transformers would build it partitioned (zero.Init: collectives
    only rank 0 would join), so that config is set aside meanwhile."""
    import copy
    from collections import Counter

    from transformers import AutoModelForImageTextToText

    from ds_vlm.patches.transformers_loading import zero3_init_set_aside

    dtype = Counter(v.dtype for v in state.values() if v.is_floating_point()).most_common(1)[0][0]
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # QLoRA's run: these weights are full precision (dequantized)
        del config.quantization_config
    with torch.device("meta"), zero3_init_set_aside():
        # plain sdpa: the run's own kernels (the varlen interface) are registered names that mean nothing here
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the weights lack {len(missing)} parameters, e.g. {missing[:3]}")
    if generation_config is not None:
        model.generation_config = generation_config
    return model


def save_lora_exports(state: dict, lora, config, generation_config, processor, out_dir: str, adapter_dir: str):
    """LoRA: out_dir gets the weights with the adapters merged (plain `from_pretrained`), adapter_dir peft's
    adapter folder. `state` is the peft model's full state dict."""
    from ds_vlm.models.lora import merged_state_dict, save_adapter

    merged = merged_state_dict(state, lora)  # quantized weights must be dequantized before (export_hf does)
    save_hf(plain_model(config, merged, generation_config), merged, processor, out_dir)
    save_adapter(state, lora, adapter_dir)


def export_hf(engine, processor, out_dir: str, lora=None, long_timeout_s: float = 7200) -> None:
    """All ranks: consolidated weights of the live engine -> out_dir on rank 0 (with LoRA: merged, and peft's
    adapter folder beside it, `adapter/`); the others wait for rank 0's writing through the store."""
    state = gathered_state_dict(engine)
    if dist.get_rank() == 0:
        if lora is None:
            save_hf(engine.module, state, processor, out_dir)
        else:
            from ds_vlm.models.lora import dequantized_state_dict

            state = dequantized_state_dict(engine.module, state)  # QLoRA: 4-bit weights back to full precision
            save_lora_exports(state, lora, engine.module.config, engine.module.generation_config, processor, out_dir,
                              str(Path(out_dir).parent / "adapter"))
    store_barrier(f"rank 0 writing {out_dir}", long_timeout_s)
