"""The training run as named verbs, in the order they run:

    setup_distributed -> setup_model -> setup_data -> setup_engine -> resume -> train -> finish

`train` is the loop: `train_step` (one optimizer step), then `log_step`, `evaluate` and `save` when due.
The state the loop carries lives in one `Progress` object.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .attention import VARLEN, SampleBoundaries, kernel_description
from .config import ConfigError, TrainConfig
from .data.batching import BatchPlan, Collator, SFTDataset, make_loader, make_plan
from .data.encode import encoder_for
from .data.formats import DataError
from .data.preflight import preflight, summarize, usable
from .data.sources import RecordIndex
from .distributed import init_distributed, release_shm_buffer, setup_threads
from .engine import (
    enable_checkpointing,
    load_model,
    lr_lambda,
    optimizer_groups,
    param_groups,
    part_parameters,
    resolve_ds_config,
    set_trainable,
    settle_optimizer,
)
from .faults import Preempted, StopSignals, Watchdog
from .lora import apply_lora, describe
from .loss import LabelLoss, check_loss_available
from .metrics import FlopsCounter, Reporter, RunLog, device_peak_tflops, plot_curves
from .parallel import SequenceParallel
from .step import StepRunner


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


class TooManyBadRecords(RuntimeError):
    """More than --max_bad records met in training (--preflight off or sample:N) were bad."""


@dataclass
class Progress:
    """What the loop carries from step to step."""

    step: int = 0                     # optimizer steps done
    bad_in_a_row: int = 0             # consecutive skipped (non-finite) steps
    skipped: int = 0                  # skipped steps in all
    bad_records: int = 0              # records left out in training for being bad (all ranks)
    clock: float = 0.0                # when the last step (or save, or evaluation) ended
    unlogged: Optional[tuple] = None  # (step, PendingStats, seconds, lr) of a step logged while the next one runs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.progress = Progress()

    # -- setup ------------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        setup_threads()
        init_distributed(self.config.dist_timeout_s)
        release_shm_buffer()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # data parallelism runs over groups of --sequence_parallel ranks that share their samples
        self.sp = SequenceParallel(self.config.sequence_parallel) if self.config.sequence_parallel > 1 else None
        self.dp_rank, self.dp_size = (self.sp.dp_rank, self.sp.dp_size) if self.sp else (self.rank, self.world)
        seed_everything(self.config.seed)
        self.log = RunLog(self.config.output_dir, enabled=self.rank == 0)
        self.stop = StopSignals(self.rank)
        self.watchdog = Watchdog(self.rank, self.world, 0.9 * self.config.dist_timeout_s)

    def setup_model(self) -> None:
        config = self.config
        self.ds_config = resolve_ds_config(config, self.world)
        try:
            check_loss_available(config.loss)
            loaded = load_model(config, self.ds_config, self.sp)
            self.encoder = encoder_for(loaded.processor, loaded.adapter, config)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.loaded, self.model, self.processor, self.adapter = loaded, loaded.model, loaded.processor, loaded.adapter
        self.groups = set_trainable(self.model, self.adapter, config)
        self.trained, self.lora = self.model, None  # what DeepSpeed trains: the model, or its peft wrapper
        if config.lora_rank:
            self.trained, self.lora = apply_lora(self.model, self.adapter, config)
            self.groups = part_parameters(self.model, self.adapter)
        enable_checkpointing(self.model, self.adapter, config)
        if self.sp is not None:
            self.sp.install(self.adapter.parts(self.model).llm_decoder, self.adapter)
        self.log.info(f"world {self.world}" + (f" ({self.dp_size} groups of {self.sp.size} sequence-parallel ranks)"
                                               if self.sp else "") + f", backend {dist.get_backend()}, ZeRO stage "
                      f"{self.zero_stage}, precision {'bf16' if self.bf16 else 'fp32'}, torch threads "
                      f"{torch.get_num_threads()}")

    @property
    def zero_stage(self) -> int:
        return self.ds_config["zero_optimization"].get("stage", 0)

    @property
    def bf16(self) -> bool:
        return self.ds_config["bf16"]["enabled"]

    def _dataset(self, spec: str) -> SFTDataset:
        """A data spec's usable records, as preflight found them (or as it left them: --preflight off)."""
        config = self.config
        records = RecordIndex(spec, config.image_root, config.data_format, config.data_cache)
        checks, said = preflight(records, self.encoder, config.preflight, config.data_cache, config.loader_workers,
                                 progress=self.rank == 0)
        self.log.info(f"preflight {spec}: {said}\n{summarize(checks)}")
        kept = usable(checks, config.bad_records, config.truncation, spec)
        if len(kept) < len(checks):
            self.log.event({"event": "skipped_records", "data": spec, "count": len(checks) - len(kept),
                            "kinds": {k: n for k, n in checks.select(checks.bad).counts().items()}})
        return SFTDataset(records, self.encoder, kept.index, skip_bad=config.preflight not in ("cached", "full"),
                          checks=kept)

    def setup_data(self) -> None:
        config = self.config
        self.train_set = self._dataset(config.train_data)
        self.eval_set = self._dataset(config.eval_data) if config.eval_data else None
        kept = self.train_set.checks
        self.plan = make_plan(config, self.dp_size, self.train_set.records, kept)
        self.total_steps = config.max_steps if config.max_steps > 0 else self.plan.steps_in(config.epochs)
        needs_positions = config.packing or self.adapter.padded_batch_positions
        positions = self.adapter.position_ids(self.model.config) if needs_positions else None
        # a dummy video rides along when some record has a video (or when nobody checked: --preflight off)
        has_video = any(bool(s.checks.n_video_tokens.any()) for s in (self.train_set, self.eval_set) if s) or (
            self.train_set.skip_bad and self.encoder.video_token is not None)
        self.collator = Collator(self.encoder.tokenizer.pad_token_id, self.encoder.dummy(), positions,
                                 multiple_of=config.sequence_parallel, packing=config.packing,
                                 dummy_video=self.encoder.dummy_video() if has_video else None)
        self.run_meta = {"world_size": self.world, "data_parallel_size": self.dp_size,
                         "sequence_parallel": config.sequence_parallel, "zero_stage": self.zero_stage,
                         "global_batch": self.plan.global_batch, "lora": describe(self.lora) if self.lora else None,
                         "total_steps": self.total_steps, "n_train_samples": len(self.train_set),
                         "config": config.to_dict()}

    def setup_engine(self) -> None:
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        config = self.config
        self.resume_from, self.universal = ckpt.resume_point(config, self.run_meta)
        if self.universal:
            ckpt.ensure_universal(self.resume_from)
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.schedule = lr_lambda(self.total_steps, config.warmup_ratio, config.min_lr_ratio)
        optimizer = settle_optimizer(self.ds_config)
        self.log.info(f"optimizer {optimizer}; attention "
                      f"{kernel_description(self.model.config.get_text_config()._attn_implementation)}")
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.trained, model_parameters=param_groups(self.groups, config), config=self.ds_config,
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, self.schedule))
        boundaries = None
        implementation = self.model.config.get_text_config()._attn_implementation
        if config.packing and (implementation in (VARLEN, "flash_attention_2") or self.sp is not None):
            boundaries = SampleBoundaries(self.adapter.parts(self.model).llm_decoder,
                                          stand_in_mask=implementation != "flash_attention_2")
        self.runner = StepRunner(self.engine, self.world, torch.bfloat16 if self.bf16 else torch.float32,
                                 LabelLoss(self.model, config.loss), FlopsCounter(self.model, self.adapter, config),
                                 boundaries, self.sp, self.watchdog.phase)
        self.peak_tflops = device_peak_tflops(config.peak_tflops)
        self.checkpointer = ckpt.Checkpointer(config.output_dir, config.save_total_limit, trained_only=bool(self.lora))
        self.reporter = Reporter(config.report_to if self.rank == 0 else "none", config.output_dir, config.to_dict())

    def resume(self) -> None:
        if self.resume_from is not None:
            ckpt.load(self.engine, self.resume_from, self.universal, trained_only=bool(self.lora))
            self.progress.step = ckpt.read_meta(self.resume_from)["step"]
            self.log.info(f"resumed from {self.resume_from} at step {self.progress.step}"
                          + (" (universal format)" if self.universal else ""))
        if self.rank == 0:
            with open(os.path.join(self.config.output_dir, "run_config.json"), "w") as f:
                json.dump({"config": self.config.to_dict(), "world_size": self.world, "ds_config": self.ds_config,
                           "optimizer_groups": optimizer_groups(self.engine)}, f, indent=2)
        batch = (f"token budget {self.config.max_tokens_per_batch}/micro-batch" if self.config.max_tokens_per_batch
                 else f"global batch {self.plan.global_batch}")
        self.log.info(f"{len(self.train_set)} train samples, {batch}, {self.plan.steps_per_epoch} steps/epoch, "
                      f"{self.total_steps} steps")
        self.log.start_progress(self.total_steps, self.progress.step)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> None:
        config, progress = self.config, self.progress
        loader = iter(make_loader(self.train_set, self.plan, self.dp_rank, progress.step, self.total_steps,
                                  self.collator, config.loader_workers))
        progress.clock = time.perf_counter()
        while progress.step < self.total_steps:
            self.train_step(loader)
            step, last = progress.step, progress.step == self.total_steps
            save_now = config.save_steps and step % config.save_steps == 0 and not last
            eval_now = self.eval_set is not None and config.eval_steps and step % config.eval_steps == 0 and not last
            if save_now or eval_now or last:
                self.log_step()  # log before a pause, so that the step's time is its own
            if save_now:
                self.save()
            if eval_now:
                self.evaluate()

    def train_step(self, loader) -> None:
        """One optimizer step; the previous step is logged while this one runs (its numbers are in flight)."""
        progress = self.progress
        lr = self.config.lr * self.schedule(self.scheduler.last_epoch)  # the language tower's; others scale alike
        step = progress.step + 1
        logged = step % self.config.logging_steps == 0 or step == self.total_steps
        self.watchdog.phase("data", step)
        micro = [next(loader) for _ in range(self.config.grad_accum)]
        bad = [message for _, meta in micro for message in meta.pop("bad")]
        for message in bad:
            print(f"ds-vlm rank {self.rank}: step {step}: left out a bad record: {message}", file=sys.stderr, flush=True)
        pending = self.runner.start(micro, with_stats=logged, stop_requested=self.stop.requested,
                                    bad_records=len(bad))
        now = time.perf_counter()
        elapsed, progress.clock = now - progress.clock, now
        self.watchdog.phase("log")
        self.log_step()
        progress.step = step
        progress.bad_in_a_row = 0 if pending.applied else progress.bad_in_a_row + 1
        progress.skipped += not pending.applied
        if logged:
            progress.unlogged = (step, pending, elapsed, lr)
        if pending.stop:
            self.preempt()
        if pending.bad_records:
            self.bad_records_met(step, pending.bad_records)
        if progress.bad_in_a_row >= self.config.max_bad_steps:
            self.log_step()
            raise TrainingDiverged(
                f"{progress.bad_in_a_row} optimizer steps in a row (up to step {progress.step}) had a non-finite loss "
                f"or gradient and were skipped; stopping. Last good checkpoint: "
                f"{ckpt.find_checkpoint(self.config.output_dir) or 'none'}. Lower --lr or check the data.")

    def bad_records_met(self, step: int, new: int) -> None:
        """Records left out for being bad (every rank knows the total): logged; more than --max_bad stop."""
        progress, limit = self.progress, self.config.max_bad
        progress.bad_records += new
        self.log.event({"event": "bad_records", "step": step, "new": new, "total": progress.bad_records})
        if progress.bad_records > limit:
            self.log_step()
            raise TooManyBadRecords(
                f"{progress.bad_records} records met in training were bad, more than --max_bad {limit}; stopping "
                f"after step {step}. Each is named in the ranks' output; check the data with "
                f"`python -m ds_vlm.validate` or train with --preflight cached.")

    def log_step(self) -> None:
        """Write the unlogged step's line (waits for its all-reduced numbers: the one host sync of a step)."""
        if self.progress.unlogged is None:
            return
        step, pending, elapsed, lr = self.progress.unlogged
        self.progress.unlogged = None
        stats = pending.result()
        tflops = stats["flops"] / elapsed / self.world / 1e12
        record = {"step": step, "loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                  "tokens_per_s": stats["tokens"] / elapsed, "samples_per_s": stats["samples"] / elapsed,
                  "step_time_s": elapsed, "tokens": stats["tokens"], "targets": stats["targets"],
                  "padding_efficiency": stats["tokens"] / max(1, stats["computed"]), "tflops_per_gpu": tflops,
                  "mfu": tflops / self.peak_tflops if self.peak_tflops else None, "peak_mem_gb": stats["peak_mem_gb"],
                  "peak_reserved_gb": stats["peak_reserved_gb"],
                  "skipped": stats["skipped"], "skipped_steps": self.progress.skipped}
        self.log.step(record)
        self.reporter.log(step, record)

    def preempt(self) -> None:
        """Every rank: the step is done; log it, checkpoint it, say so, and stop (exit PREEMPTED_EXIT)."""
        self.log_step()
        saved = self.save()
        step = self.progress.step
        self.log.event({"event": "preempted", "step": step, "checkpoint_saved": saved})
        self.log.close()
        raise Preempted(f"preempted after step {step}: " + (f"checkpoint {self.checkpointer.root}/step_{step:08d} "
                        "written; run the same command to resume" if saved else "the checkpoint FAILED"))

    def save(self) -> bool:
        self.watchdog.phase("checkpoint")
        step = self.progress.step
        ok, error = self.checkpointer.save(self.engine, step, self.run_meta, self.processor)
        path = str(self.checkpointer.root / f"step_{step:08d}")
        self.log.event({"event": "checkpoint", "step": step, "path": path} if ok else
                       {"event": "checkpoint_failed", "step": step, "error": error})
        self.log.info(f"saved {path}" if ok else f"checkpoint at step {step} FAILED ({error}); earlier checkpoints "
                                                 f"are intact")
        self.progress.clock = time.perf_counter()
        return ok

    def evaluate(self) -> dict:
        self.watchdog.phase("eval")
        step = self.progress.step
        result = self.eval_loss()
        result.update(self.eval_answers())
        self.log.event({"event": "eval", "step": step, **result})
        self.reporter.log(step, result)
        self.log.info(f"step {step}: eval loss {result['eval_loss']:.4f}" + (
            f", exact match {result['exact_match']:.1%}" if "exact_match" in result else ""))
        self.progress.clock = time.perf_counter()
        return result

    def eval_loss(self) -> dict:
        plan = BatchPlan(len(self.eval_set), self.config.micro_batch_size, 1, self.dp_size, self.config.seed)
        loader = make_loader(self.eval_set, plan, self.dp_rank, 0, plan.steps_per_epoch, self.collator, 0)
        self.engine.eval()
        try:
            return self.runner.eval_loss(loader)
        finally:
            self.engine.train()

    def eval_answers(self) -> dict:
        """Greedy answers to the first --eval_generate eval records (all ranks run generate together, as ZeRO-3
        needs); rank 0 appends them to samples.jsonl. Returns exact-match accuracy."""
        from .generation import generate_answers, reference

        samples = []
        for i in self.eval_set.indices[:self.config.eval_generate]:
            try:
                samples.append(self.eval_set.records.sample(int(i)))
            except DataError:  # --preflight off: a bad record is left out here too
                pass
        if not samples:
            return {}
        self.engine.eval()
        try:
            answers = generate_answers(self.engine.module, self.processor, samples, max_new_tokens=64,
                                       video_sampling=self.encoder.video_sampling,
                                       synced_gpus=self.engine.zero_optimization_partition_weights())
        finally:
            self.engine.train()
        rows = [{"step": self.progress.step, "source": s.source, "index": s.index, "reference": reference(s),
                 "answer": a, "correct": a == reference(s)} for s, a in zip(samples, answers)]
        if self.rank == 0:
            with open(os.path.join(self.config.output_dir, "samples.jsonl"), "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return {"exact_match": sum(r["correct"] for r in rows) / len(rows)}

    # -- the end ----------------------------------------------------------------------------------
    def finish(self) -> dict:
        config = self.config
        result = {"steps": self.total_steps}
        if self.eval_set is not None:
            result.update(self.evaluate())
        saved = self.save()
        if config.export_hf:
            self.watchdog.phase("export")
            ckpt.export_hf(self.engine, self.processor, os.path.join(config.output_dir, "hf"), self.lora)
            self.log.info(f"exported {os.path.join(config.output_dir, 'hf')}")
        self.log.close()
        self.reporter.close()
        if self.rank == 0:
            plot_curves(os.path.join(config.output_dir, "metrics.jsonl"), os.path.join(config.output_dir, "curves.png"))
        self.watchdog.phase(None)
        if not saved:
            raise RuntimeError(f"the final checkpoint (step {self.total_steps}) could not be written; see metrics.jsonl")
        return result


def run(config: TrainConfig) -> dict:
    trainer = Trainer(config)
    trainer.setup_distributed()
    trainer.setup_model()
    trainer.setup_data()
    trainer.setup_engine()
    trainer.resume()
    trainer.train()
    return trainer.finish()
