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
from .data.batching import BatchPlan, Collator, RecordIndex, SFTDataset, TokenBudgetPlan
from .data.encode import Encoder, set_pixel_bounds
from .data.preflight import check_records, summarize
from .engine import (StepRunner, enable_checkpointing, load_model, lr_lambda, optimizer_groups, param_groups,
                     resolve_ds_config, set_trainable)
from .loss import LabelLoss, check_loss_available
from .metrics import FlopsCounter, Reporter, RunLog, device_peak_tflops, plot_curves


class BadDataError(RuntimeError):
    """Preflight found bad records and --bad_records is error."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


class RendezvousError(RuntimeError):
    """Not every rank reached the rendezvous within --dist_timeout_s (a node did not join)."""


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


def preflight(records: RecordIndex, encoder: Encoder, config: TrainConfig, log: RunLog, what: str) -> list:
    """Every rank checks its share of the records; all agree on the good ones (their RecordChecks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = check_records(records, encoder, list(range(rank, len(records), world)), config.num_workers)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    checks = sorted((c for part in gathered for c in part), key=lambda c: c.index)
    bad = [c for c in checks if c.kind != "ok"]
    log.info(f"preflight {what}: {summarize(checks)}")
    dropped_by_choice = config.bad_records == "skip" or (config.truncation == "skip" and
                                                          all(c.kind == "too_long" for c in bad))
    if bad and not dropped_by_choice:
        raise BadDataError(f"{len(bad)} bad record(s) in {what}; fix them or pass --bad_records skip.\n"
                           + summarize(checks, show=10))
    if bad:
        log.event({"event": "skipped_records", "data": what, "count": len(bad),
                   "kinds": {k: sum(c.kind == k for c in bad) for k in {c.kind for c in bad}}})
    good = [c for c in checks if c.kind == "ok"]
    if not good:
        raise BadDataError(f"no usable record in {what}")
    return good


def make_plan(config: TrainConfig, world: int, records: RecordIndex, kept: list) -> BatchPlan:
    """Fixed-size micro-batches, or token-budget ones with --max_tokens_per_batch."""
    common = dict(n_samples=len(kept), micro_batch_size=config.micro_batch_size, grad_accum=config.grad_accum,
                  world_size=world, seed=config.seed, source_sizes=records.source_sizes([c.index for c in kept]),
                  weights=records.weights)
    if config.max_tokens_per_batch:
        return TokenBudgetPlan(**common, lengths=[c.n_tokens for c in kept], max_tokens=config.max_tokens_per_batch)
    return BatchPlan(**common)


def make_loader(dataset, plan: BatchPlan, rank: int, start: int, steps: int, collator, num_workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=list(plan.iterate(rank, start, steps)), collate_fn=collator,
                      num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
                      pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def init_distributed(timeout_s: int) -> None:
    """deepspeed.init_distributed; a rendezvous that fails (a node never joined, the master never came up)
    becomes one RendezvousError that says so. --dist_timeout_s bounds the rendezvous as well: the master's
    store waits that long for every rank; the other ranks try that long to reach it (torch retries once)."""
    import re

    import deepspeed

    try:
        deepspeed.init_distributed(dist_backend=None, timeout=timedelta(seconds=timeout_s))
    except dist.DistError as err:  # DistStoreError / DistNetworkError from the TCPStore rendezvous
        env = os.environ.get
        where = f"{env('MASTER_ADDR', '?')}:{env('MASTER_PORT', '?')}"
        joined = re.search(r"(\d+)/(\d+) clients joined", str(err))
        if joined:
            what = (f"only {joined[1]} of {joined[2]} ranks joined the rendezvous at {where} within {timeout_s} s: "
                    f"a node did not join")
        else:
            what = (f"rank {env('RANK', '?')} could not reach the master (node 0) at {where} "
                    f"(--dist_timeout_s {timeout_s}): node 0 did not start or cannot be reached")
        raise RendezvousError(
            f"{what}. Start the launcher on every node with the same hostfile, --master_addr and --master_port, "
            f"check that the port is open between the nodes, and raise --dist_timeout_s if nodes start far apart. "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0]})") from err


def release_shm_buffer() -> None:
    """On CPU with every rank on one node, DeepSpeed's shared-memory allreduce creates one ~70 MB
    /dev/shm file per rank and never removes it (RAM, filling up run after run). Once init has
    returned on every rank all of them are mapped, so each rank unlinks its own: the memory goes
    when the run ends, even on kill -9."""
    if torch.cuda.is_available() or not os.path.isdir("/dev/shm"):
        return
    dist.barrier()
    env = os.environ.get
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{env('MASTER_ADDR', '')}_{env('MASTER_PORT', '')}_"
            f"{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


def run(config: TrainConfig) -> dict:
    import deepspeed

    setup_threads()
    init_distributed(config.dist_timeout_s)
    release_shm_buffer()
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(config.seed)
    log = RunLog(config.output_dir, 0, 0, enabled=False)

    # -- model and data ----------------------------------------------------------------
    ds_config = resolve_ds_config(config, world)
    try:
        check_loss_available(config.loss)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    loaded = load_model(config, ds_config)
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    groups = set_trainable(model, adapter, config)
    enable_checkpointing(model, adapter, config)  # language tower; vision tower with --vision_checkpointing
    try:
        set_pixel_bounds(processor, config.min_pixels, config.max_pixels)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    encoder = Encoder(processor, adapter, config.max_length, config.truncation)
    if rank == 0:
        log = RunLog(config.output_dir, 0, 0, enabled=True)
        log.info(f"world {world}, ZeRO stage {ds_config['zero_optimization'].get('stage', 0)}, "
                 f"precision {'bf16' if ds_config['bf16']['enabled'] else 'fp32'}, "
                 f"torch threads {torch.get_num_threads()}")
    train_records = RecordIndex(config.train_data, config.image_root, config.data_format)
    train_kept = preflight(train_records, encoder, config, log, config.train_data)
    train_set = SFTDataset(train_records, encoder, [c.index for c in train_kept])
    eval_set = None
    if config.eval_data:
        eval_records = RecordIndex(config.eval_data, config.image_root, config.data_format)
        eval_kept = preflight(eval_records, encoder, config, log, config.eval_data)
        eval_set = SFTDataset(eval_records, encoder, [c.index for c in eval_kept])

    plan = make_plan(config, world, train_records, train_kept)
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
    runner = StepRunner(engine, world, dtype, LabelLoss(model, config.loss),
                        FlopsCounter(model, adapter.parts(model), config))
    peak_tflops = device_peak_tflops(config.peak_tflops)
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
            json.dump({"config": config.to_dict(), "world_size": world, "ds_config": ds_config,
                       "optimizer_groups": optimizer_groups(engine)}, f, indent=2)
        batch = (f"token budget {config.max_tokens_per_batch}/micro-batch" if config.max_tokens_per_batch
                 else f"global batch {plan.global_batch}")
        log.info(f"{len(train_set)} train samples, {batch}, "
                 f"{plan.steps_per_epoch} steps/epoch, {total_steps} steps")
    reporter = Reporter(config.report_to if rank == 0 else "none", config.output_dir, config.to_dict())

    def evaluate(step: int) -> dict:
        result = evaluate_loss(runner, eval_set, config, collator, rank, world)
        result.update(evaluate_generation(engine, processor, eval_set, config, step))
        log.event({"event": "eval", "step": step, **result})
        reporter.log(step, result)
        log.info(f"step {step}: eval loss {result['eval_loss']:.4f}" + (
            f", exact match {result['exact_match']:.1%}" if "exact_match" in result else ""))
        return result

    loader = iter(make_loader(train_set, plan, rank, start_step, total_steps, collator, config.num_workers))
    last = time.perf_counter()
    bad_in_a_row, skipped = 0, 0

    def log_step(step: int, pending_stats, elapsed: float, lr: float) -> None:
        nonlocal bad_in_a_row, skipped
        stats = pending_stats.result()  # waits for the step's all-reduced sums
        bad_in_a_row = bad_in_a_row + 1 if stats["skipped"] else 0
        skipped += stats["skipped"]
        tflops = stats["flops"] / elapsed / world / 1e12
        record = {"step": step + 1, "loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                  "tokens_per_s": stats["tokens"] / elapsed, "samples_per_s": stats["samples"] / elapsed,
                  "step_time_s": elapsed, "tokens": stats["tokens"], "targets": stats["targets"],
                  "padding_efficiency": stats["tokens"] / max(1, stats["computed"]),
                  "tflops_per_gpu": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
                  "peak_mem_gb": stats["peak_mem_gb"],
                  "skipped": stats["skipped"], "skipped_steps": skipped}
        log.step(record)
        reporter.log(step + 1, record)
        if bad_in_a_row >= config.max_bad_steps:
            good = ckpt.find_checkpoint(config.output_dir)
            raise TrainingDiverged(
                f"{bad_in_a_row} optimizer steps in a row (up to step {step + 1}) had a non-finite loss or gradient "
                f"and were skipped; stopping. Last good checkpoint: {good or 'none'}. Lower --lr or check the data.")

    # Step k is logged while step k+1 runs: its sums are all-reduced in the background, so no step
    # waits on a collective of its own beyond DeepSpeed's; before a save or an evaluation it is logged first.
    pending = None
    for step in range(start_step, total_steps):
        lr = config.lr * schedule(scheduler.last_epoch)  # the language tower's; other groups scale alike
        micro = [next(loader) for _ in range(config.grad_accum)]
        started = runner.start(micro)
        now = time.perf_counter()
        elapsed, last = now - last, now
        if pending is not None:
            log_step(*pending)
        pending = (step, started, elapsed, lr)
        save_now = config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < total_steps
        eval_now = eval_set is not None and config.eval_steps and (step + 1) % config.eval_steps == 0 \
            and step + 1 < total_steps
        if save_now or eval_now or step + 1 == total_steps:
            log_step(*pending)
            pending = None
        if save_now:
            save(step + 1)
            last = time.perf_counter()
        if eval_now:
            evaluate(step + 1)
            last = time.perf_counter()

    # -- end -----------------------------------------------------------------------------
    result = {"steps": total_steps}
    if eval_set is not None:
        result.update(evaluate(total_steps))
    saved = save(total_steps)
    if config.export_hf:
        ckpt.export_hf(engine, processor, os.path.join(config.output_dir, "hf"))
        log.info(f"exported {os.path.join(config.output_dir, 'hf')}")
    log.close()
    reporter.close()
    if rank == 0:
        plot_curves(os.path.join(config.output_dir, "metrics.jsonl"), os.path.join(config.output_dir, "curves.png"))
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
    if config.max_tokens_per_batch and meta["world_size"] != run_meta["world_size"]:
        diffs.append(f"world size with token-budget batching: checkpoint {meta['world_size']}, now "
                     f"{run_meta['world_size']} (micro-batches are dealt per rank)")
    if meta.get("n_train_samples") != run_meta["n_train_samples"]:
        diffs.append(f"usable train samples: checkpoint {meta.get('n_train_samples')}, now "
                     f"{run_meta['n_train_samples']}")
    if diffs and not config.resume_ignore_config:
        raise ConfigError(f"cannot resume exactly from {found}; the run differs in:\n  " + "\n  ".join(diffs)
                          + "\npass --resume_ignore_config to resume anyway, or --resume none to start fresh")
    universal = meta["world_size"] != run_meta["world_size"] and meta["zero_stage"] >= 1
    return found, universal


def evaluate_generation(engine, processor, dataset, config: TrainConfig, step: int) -> dict:
    """Greedy answers to the first --eval_generate eval records (all ranks run generate together, as
    ZeRO-3 needs); rank 0 appends them to samples.jsonl. Returns exact-match accuracy."""
    from .evaluate import generate_answers, reference

    samples = [dataset.records.sample(i) for i in dataset.indices[:config.eval_generate]]
    if not samples:
        return {}
    engine.eval()
    try:
        answers = generate_answers(engine.module, processor, samples, max_new_tokens=64,
                                   synced_gpus=engine.zero_optimization_partition_weights())
    finally:
        engine.train()
    rows = [{"step": step, "source": s.source, "index": s.index, "reference": reference(s), "answer": a,
             "correct": a == reference(s)} for s, a in zip(samples, answers)]
    if dist.get_rank() == 0:
        with open(os.path.join(config.output_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return {"exact_match": sum(r["correct"] for r in rows) / len(rows)}


def evaluate_loss(runner: StepRunner, dataset, config: TrainConfig, collator, rank: int, world: int) -> dict:
    plan = BatchPlan(len(dataset), config.micro_batch_size, 1, world, config.seed)
    loader = make_loader(dataset, plan, rank, 0, plan.steps_per_epoch, collator, 0)
    runner.engine.eval()
    try:
        return runner.eval_loss(loader)
    finally:
        runner.engine.train()
