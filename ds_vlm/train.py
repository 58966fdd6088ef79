"""The training run, top to bottom: setup, preflight, loop, save, export."""

from __future__ import annotations

import json
import os
import random
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig
from .data.batching import BatchPlan, Collator, RecordIndex, SFTDataset
from .data.encode import Encoder
from .data.preflight import check_records, summarize
from .engine import (StepRunner, load_model, lr_lambda, param_groups, resolve_ds_config, set_trainable)
from .metrics import RunLog


class BadDataError(RuntimeError):
    """Preflight found bad records and --bad_records is error."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


def setup_threads() -> None:
    """On CPU, give each local rank its share of the cores (the default oversubscribes badly)."""
    if torch.cuda.is_available():
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores // max(1, local_ranks)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worker_init(_):
    torch.set_num_threads(1)


def preflight(records: RecordIndex, encoder: Encoder, config: TrainConfig, log: RunLog, what: str) -> list[int]:
    """Every rank checks its share of the records; all agree on the good ones."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = check_records(records, encoder, list(range(rank, len(records), world)), config.num_workers)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    checks = sorted((c for part in gathered for c in part), key=lambda c: c.index)
    bad = [c for c in checks if c.kind != "ok"]
    log.info(f"preflight {what}: {summarize(checks)}")
    if bad and config.bad_records == "error":
        raise BadDataError(f"{len(bad)} bad record(s) in {what}; fix them or pass --bad_records skip.\n"
                           + summarize(checks, show=10))
    if bad:
        log.event({"event": "skipped_records", "data": what, "count": len(bad),
                   "kinds": {k: sum(c.kind == k for c in bad) for k in {c.kind for c in bad}}})
    good = [c.index for c in checks if c.kind == "ok"]
    if not good:
        raise BadDataError(f"no usable record in {what}")
    return good


def make_loader(dataset, plan: BatchPlan, rank: int, start: int, steps: int, collator, num_workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=list(plan.iterate(rank, start, steps)), collate_fn=collator,
                      num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def run(config: TrainConfig) -> dict:
    import deepspeed

    setup_threads()
    deepspeed.init_distributed(dist_backend=None, timeout=timedelta(seconds=config.dist_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(config.seed)
    log = RunLog(config.output_dir, 0, 0, enabled=False)

    # -- model and data ----------------------------------------------------------------
    ds_config = resolve_ds_config(config, world)
    loaded = load_model(config, ds_config)
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    groups = set_trainable(model, adapter, config)
    if config.gradient_checkpointing:
        adapter.parts(model).llm_decoder.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings must not cut the checkpointed graph
    encoder = Encoder(processor, adapter, config.max_length)
    if rank == 0:
        log = RunLog(config.output_dir, 0, 0, enabled=True)
        log.info(f"world {world}, ZeRO stage {ds_config['zero_optimization'].get('stage', 0)}, "
                 f"precision {'bf16' if ds_config['bf16']['enabled'] else 'fp32'}, "
                 f"torch threads {torch.get_num_threads()}")
    train_records = RecordIndex(config.train_data.split(","), config.image_root)
    train_set = SFTDataset(train_records, encoder, preflight(train_records, encoder, config, log, config.train_data))
    eval_set = None
    if config.eval_data:
        eval_records = RecordIndex(config.eval_data.split(","), config.image_root)
        eval_set = SFTDataset(eval_records, encoder, preflight(eval_records, encoder, config, log, config.eval_data))

    plan = BatchPlan(len(train_set), config.micro_batch_size, config.grad_accum, world, config.seed)
    total_steps = config.max_steps if config.max_steps > 0 else config.epochs * plan.steps_per_epoch
    run_meta = {"world_size": world, "zero_stage": ds_config["zero_optimization"].get("stage", 0),
                "global_batch": plan.global_batch, "total_steps": total_steps, "n_train_samples": len(train_set),
                "config": config.to_dict()}
    resume_from, universal = find_resume(config, run_meta)
    if universal:
        ckpt.ensure_universal(resume_from)
        ds_config["checkpoint"] = {"load_universal": True}

    # -- engine --------------------------------------------------------------------------
    from torch.optim.lr_scheduler import LambdaLR

    schedule = lr_lambda(total_steps, config.warmup_ratio, config.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(groups, config), config=ds_config,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, schedule))
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    runner = StepRunner(engine, world, dtype)
    collator = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())

    # -- loop ----------------------------------------------------------------------------
    start_step = 0
    if resume_from is not None:
        ckpt.load(engine, resume_from, universal)
        start_step = ckpt.read_meta(resume_from)["step"]
        log.info(f"resumed from {resume_from} at step {start_step}" + (" (universal format)" if universal else ""))
    checkpointer = ckpt.Checkpointer(config.output_dir, config.save_total_limit)

    def save(step: int) -> bool:
        ok, error = checkpointer.save(engine, step, run_meta, processor)
        path = str(checkpointer.root / f"step_{step:08d}")
        log.event({"event": "checkpoint", "step": step, "path": path} if ok else
                  {"event": "checkpoint_failed", "step": step, "error": error})
        log.info(f"saved {path}" if ok else f"checkpoint at step {step} FAILED ({error}); earlier checkpoints "
                                            f"are intact")
        return ok

    if rank == 0:
        log.close()
        log = RunLog(config.output_dir, total_steps, start_step, enabled=True)
        with open(os.path.join(config.output_dir, "run_config.json"), "w") as f:
            json.dump({"config": config.to_dict(), "world_size": world, "ds_config": ds_config}, f, indent=2)
        log.info(f"{len(train_set)} train samples, global batch {plan.global_batch}, "
                 f"{plan.steps_per_epoch} steps/epoch, {total_steps} steps")
    loader = iter(make_loader(train_set, plan, rank, start_step, total_steps, collator, config.num_workers))
    last = time.perf_counter()
    bad_in_a_row, skipped = 0, 0
    for step in range(start_step, total_steps):
        lr = scheduler.get_last_lr()[0]
        micro = [next(loader) for _ in range(config.grad_accum)]
        stats = runner.run(micro)
        now = time.perf_counter()
        elapsed, last = now - last, now
        bad_in_a_row = bad_in_a_row + 1 if stats["skipped"] else 0
        skipped += stats["skipped"]
        log.step({"step": step + 1, "loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                  "tokens_per_s": stats["tokens"] / elapsed, "samples_per_s": stats["samples"] / elapsed,
                  "step_time_s": elapsed, "tokens": stats["tokens"], "targets": stats["targets"],
                  "skipped": stats["skipped"], "skipped_steps": skipped})
        if bad_in_a_row >= config.max_bad_steps:
            good = ckpt.find_checkpoint(config.output_dir)
            raise TrainingDiverged(
                f"{bad_in_a_row} optimizer steps in a row (up to step {step + 1}) had a non-finite loss or gradient "
                f"and were skipped; stopping. Last good checkpoint: {good or 'none'}. Lower --lr or check the data.")
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < total_steps:
            save(step + 1)
            last = time.perf_counter()

    # -- end -----------------------------------------------------------------------------
    result = {"steps": total_steps}
    if eval_set is not None:
        result.update(evaluate_loss(runner, eval_set, config, collator, rank, world))
        log.event({"event": "eval", "step": total_steps, **result})
        log.info(f"eval loss {result['eval_loss']:.4f}")
    saved = save(total_steps)
    if config.export_hf:
        ckpt.export_hf(engine, processor, os.path.join(config.output_dir, "hf"))
        log.info(f"exported {os.path.join(config.output_dir, 'hf')}")
    log.close()
    if not saved:
        raise RuntimeError(f"the final checkpoint (step {total_steps}) could not be written; see metrics.jsonl")
    return result


def find_resume(config: TrainConfig, run_meta: dict):
    """(checkpoint to resume from or None, whether it needs the universal format)."""
    if config.resume == "none":
        return None, False
    source = config.output_dir if config.resume == "auto" else config.resume
    found = ckpt.find_checkpoint(source)
    if found is None:
        if config.resume != "auto":
            raise ConfigError(f"--resume {config.resume}: no complete checkpoint there")
        return None, False
    meta = ckpt.read_meta(found)
    diffs = ckpt.config_differences(meta, run_meta["config"], run_meta["global_batch"], run_meta["total_steps"])
    if meta.get("n_train_samples") != run_meta["n_train_samples"]:
        diffs.append(f"usable train samples: checkpoint {meta.get('n_train_samples')}, now "
                     f"{run_meta['n_train_samples']}")
    if diffs and not config.resume_ignore_config:
        raise ConfigError(f"cannot resume exactly from {found}; the run differs in:\n  " + "\n  ".join(diffs)
                          + "\npass --resume_ignore_config to resume anyway, or --resume none to start fresh")
    universal = meta["world_size"] != run_meta["world_size"] and meta["zero_stage"] >= 1
    return found, universal


def evaluate_loss(runner: StepRunner, dataset, config: TrainConfig, collator, rank: int, world: int) -> dict:
    plan = BatchPlan(len(dataset), config.micro_batch_size, 1, world, config.seed)
    loader = make_loader(dataset, plan, rank, 0, plan.steps_per_epoch, collator, 0)
    runner.engine.eval()
    try:
        return runner.eval_loss(loader)
    finally:
        runner.engine.train()
