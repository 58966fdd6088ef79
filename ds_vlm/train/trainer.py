"""The training run as named verbs, in the order they run:

    setup_distributed -> open_data -> setup_model -> setup_data -> setup_engine -> resume -> record_run -> train
    -> finish

`train` is the loop: `train_step` (one optimizer step), the step log's line of the step before (step_log.py),
`Progress.after` (preemption, bad records, divergence; progress.py), then `save` and `evaluate` when due.
Everything the run is made of is declared on `Trainer`, in the order the verbs set it up; the state the loop
carries from step to step is one `Progress`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

import ds_vlm.runtime.distributed as comm
from ds_vlm.checkpoint.hf import export_hf
from ds_vlm.checkpoint.meta import RunMeta
from ds_vlm.checkpoint.resume import ensure_universal, holds_autoep_layers, load, resume_point
from ds_vlm.checkpoint.rng import seed_everything
from ds_vlm.checkpoint.save import Checkpointer
from ds_vlm.config import ConfigError, TrainConfig
from ds_vlm.data.batching import (
    Collator,
    MicroBatch,
    SFTDataset,
    loader_settings,
    make_loader,
    open_records,
    preflighted,
)
from ds_vlm.data.encode import Encoder, encoder_for
from ds_vlm.data.plan import BatchPlan, make_plan
from ds_vlm.data.preflight import BadRecordCount
from ds_vlm.data.sources import RecordIndex
from ds_vlm.eval.during import Evaluator
from ds_vlm.memplan.startup import plan_at_start
from ds_vlm.models.loading import LoadedModel, load_model, prepare_for_training
from ds_vlm.models.lora import describe
from ds_vlm.parallel import ParallelLayout
from ds_vlm.parallel.attention import VARLEN, SampleBoundaries, kernel_description, resolve_attention
from ds_vlm.parallel.expert import ep_size_of, fill_autoep_section, keep_autoep_layout, record_router_logits
from ds_vlm.parallel.linear_attention import describe as describe_linear_attention
from ds_vlm.parallel.linear_attention import has_linear_attention
from ds_vlm.runtime.console import quiet_console, say_once
from ds_vlm.runtime.faults import Preempted, StopSignals, Watchdog
from ds_vlm.runtime.flops import FlopsCounter, device_peak_tflops
from ds_vlm.runtime.run_log import Reporter, RunLog
from ds_vlm.train.ds_config import DSSettings, resolve_ds_config
from ds_vlm.train.forward import ForwardContext
from ds_vlm.train.loss import LabelLoss, check_loss_available
from ds_vlm.train.optim import lr_lambda, optimizer_groups, param_groups, settle_optimizer_for
from ds_vlm.train.progress import AGREED_STOPS, Progress
from ds_vlm.train.step import PendingStep, StepRunner
from ds_vlm.train.step_log import StepLog


class Trainer:
    """A run's components, declared here and set up by the verbs, in this order."""

    config: TrainConfig
    progress: Progress
    # setup_distributed
    layout: ParallelLayout
    sp: Optional["SequenceParallel"]  # noqa: F821 - parallel.ulysses, imported only when --sequence_parallel > 1
    signals: StopSignals
    watchdog: Watchdog
    # open_data: the data files' indexes (a missing file is said before the model loads), then the run's log
    train_records: RecordIndex
    eval_records: Optional[RecordIndex]
    log: RunLog
    bad_records: BadRecordCount
    # setup_model: the DeepSpeed json and its DSSettings, the model (with processor and family adapter), what
    # DeepSpeed trains (the model or its peft wrapper), the LoRA config (peft's; None: full fine-tuning), part ->
    # [(name, parameter)]
    ds_config: dict
    ds: DSSettings
    loaded: LoadedModel
    encoder: Encoder
    trained: torch.nn.Module
    lora: Optional[object]
    groups: dict[str, list]
    # setup_data: what a checkpoint records to judge an exact resume is run_meta
    train_set: SFTDataset
    eval_set: Optional[SFTDataset]
    plan: BatchPlan
    total_steps: int
    collator: Collator
    run_meta: RunMeta
    # setup_engine: the checkpoint to resume from (universal: on another world size), the LR factor per step
    resume_from: Optional[os.PathLike]
    universal: bool
    schedule: object
    engine: object
    scheduler: object
    runner: StepRunner
    evaluator: Optional[Evaluator]
    checkpointer: Checkpointer
    reporter: Reporter
    step_log: StepLog

    def __init__(self, config: TrainConfig):
        self.config = config
        self.progress = Progress()
        self.in_flight: tuple[str, ...] = ()  # the records of the step in progress ("FILE record I"), for errors

    # -- setup ------------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        config = self.config
        say_once(f"starting {os.environ.get('WORLD_SIZE', '1')} rank(s): rendezvous, loading {config.model.path}, "
                 "preflight of the data, the engine, then the first step")  # the first line, before anything slow
        comm.setup_threads()
        comm.init_distributed(config.parallel.dist_timeout_s)
        comm.release_shm_buffer()
        self.layout = ParallelLayout(comm.world_size(), comm.rank(), config.parallel.sequence_parallel)
        quiet_console(self.layout.rank, config.logging.verbose)
        self.sp = None
        if self.layout.sp_size > 1:
            from ds_vlm.parallel.ulysses import SequenceParallel

            self.sp = SequenceParallel.joined(self.layout)
        seed_everything(config.seed)
        self.signals = StopSignals(self.layout.rank)
        self.watchdog = Watchdog(self.layout.rank, self.layout.world_size, 0.9 * config.parallel.dist_timeout_s,
                                 config.parallel.long_phase_timeout_s)

    def open_data(self) -> None:
        """The data files indexed (cheap once cached; a missing or unreadable file raises here), then the output
        folder and its metrics.jsonl: a run that cannot start on its data leaves nothing behind."""
        data = self.config.data
        self.train_records = open_records(data.train_data, data)
        self.eval_records = open_records(data.eval_data, data) if data.eval_data else None
        self.log = RunLog(self.config.checkpoint.output_dir, enabled=self.layout.rank == 0)
        self.bad_records = BadRecordCount(data.max_bad, self.log)

    def setup_model(self) -> None:
        config, model_config = self.config, self.config.model
        self.ds_config = resolve_ds_config(config, self.layout.world_size)
        self.ds = DSSettings.of(self.ds_config)
        config.parallel.expert_parallel = ep_size_of(self.ds_config)  # the json's section too: the meta's EP size
        try:
            check_loss_available(model_config.loss)
            attention = resolve_attention(model_config.attn_implementation, config.batch.packing,
                                          dtype=self.model_dtype)
            self.loaded = load_model(model_config, self.ds, attention, self.sp, config.batch.packing)
            model, adapter = self.loaded.model, self.loaded.adapter
            fill_autoep_section(self.ds_config, adapter, model.config, config.checkpoint.export_hf,
                                bool(model_config.lora_rank))
            self.encoder = encoder_for(self.loaded.processor, adapter, config.data)
            prepared = prepare_for_training(model, adapter, model_config, sequence_parallel=self.sp)  # generic: refused
        except (ValueError, OSError) as err:  # UnsupportedModel, a folder without weights: one line each
            raise ConfigError(str(err)) from err
        self.trained, self.lora, self.groups = prepared.trained, prepared.lora, prepared.groups
        self.log.info(f"{self.layout.describe()}, backend {comm.backend()}, ZeRO stage {self.zero_stage}, precision "
                      f"{'bf16' if self.bf16 else 'fp32'}, torch threads {torch.get_num_threads()}")

    @property
    def zero_stage(self) -> int:
        return self.ds.stage

    @property
    def bf16(self) -> bool:
        return self.ds.bf16

    @property
    def model_dtype(self) -> torch.dtype:
        return self.ds.dtype

    def setup_data(self) -> None:
        config, batch, rank0 = self.config, self.config.batch, self.layout.rank == 0
        data = config.data
        self.train_set = preflighted(self.train_records, data.train_data, data, self.encoder, self.log, rank0)
        self.eval_set = preflighted(self.eval_records, data.eval_data, data, self.encoder, self.log, rank0) \
            if self.eval_records is not None else None
        start = plan_at_start(config, self.loaded, self.ds, self.layout.world_size, self.train_set.checks,
                              self.encoder)
        batch.max_tokens_per_batch = start.max_tokens_per_batch  # --max_tokens_per_batch auto, resolved
        for line in start.lines:
            self.log.info(line)  # rank 0's
        self.plan = make_plan(batch, config.seed, self.layout.dp_size, self.train_set.records, self.train_set.checks)
        self.total_steps = batch.max_steps if batch.max_steps > 0 else self.plan.steps_in(batch.epochs)
        self.collator = Collator.for_run(self.encoder, self.loaded.adapter, self.loaded.model.config, batch,
                                         self.layout.sp_size, (self.train_set, self.eval_set), self.model_dtype)
        self.run_meta = RunMeta(self.layout.world_size, self.layout.dp_size, self.layout.sp_size, self.zero_stage,
                                self.plan.global_batch, describe(self.lora) if self.lora else None, self.total_steps,
                                len(self.train_set), config.to_keys())

    def setup_engine(self) -> None:
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        config, model, adapter = self.config, self.loaded.model, self.loaded.adapter
        self.resume_from, self.universal = resume_point(config.checkpoint, self.run_meta)
        if self.resume_from is not None and holds_autoep_layers(self.resume_from) and ep_size_of(self.ds_config) == 1:
            keep_autoep_layout(self.ds_config)  # EP 1 resuming AutoEP's layout: AutoEP at size 1
            fill_autoep_section(self.ds_config, adapter, model.config, config.checkpoint.export_hf,
                                bool(config.model.lora_rank))
        if self.universal:
            ensure_universal(self.resume_from, config.parallel.long_phase_timeout_s, self.watchdog.phase)
            self.ds_config = {**self.ds_config, "checkpoint": {"load_universal": True}}
        self.schedule = lr_lambda(self.total_steps, config.optim.warmup_ratio, config.optim.min_lr_ratio)
        implementation = model.config.get_text_config()._attn_implementation
        linear = f"; {describe_linear_attention()}" if has_linear_attention(model.config) else ""
        optimizer = settle_optimizer_for(self.ds, self.trained)
        self.ds_config = optimizer.applied(self.ds_config)
        self.log.info(f"optimizer {optimizer.description}; attention "
                      f"{kernel_description(implementation, dtype=self.model_dtype)}" + linear)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.trained, model_parameters=param_groups(self.groups, config.optim, optimizer.muon),
            config=self.ds_config,
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, self.schedule))
        record_router_logits(self.engine.module, adapter, self.ds_config)
        self.groups = {}  # AutoEP replaced the experts' tensors: the ones listed here would stay alive otherwise
        # from_pretrained returns the model in eval mode, and transformers checkpoints a layer only in training
        # mode: without this, --gradient_checkpointing (and dropout) did nothing until the first evaluation
        self.engine.train()
        boundaries = None
        # linear-attention layers (Qwen3.5) need the boundaries whatever the attention: without them their conv
        # and recurrent state run across samples (on sdpa, full attention keeps its mask from the positions)
        if config.batch.packing and (implementation in (VARLEN, "flash_attention_2") or self.sp is not None
                                     or has_linear_attention(model.config)):
            boundaries = SampleBoundaries(adapter.parts(model).llm_decoder,
                                          stand_in_mask=implementation not in ("flash_attention_2", "sdpa", "eager"))
        context = ForwardContext(LabelLoss(model, config.model.loss), self.engine.device,
                                 self.model_dtype, boundaries, self.sp,
                                 adapter.router_aux_loss_coef(model.config))
        self.runner = StepRunner(self.engine, self.layout.world_size, context,
                                 FlopsCounter(model, adapter, config.model), self.watchdog.phase,
                                 config.logging.measure_memory)
        self.evaluator = None if self.eval_set is None else Evaluator(
            self.eval_set, self.collator, self.runner, self.engine, self.loaded.processor, self.encoder.video_sampling,
            config.checkpoint.output_dir, config.batch.micro_batch_size, config.logging.eval_generate,
            self.layout.dp_rank, self.layout.dp_size, config.seed, self.layout.rank)
        self.checkpointer = Checkpointer(config.checkpoint.output_dir, config.checkpoint.save_total_limit,
                                         bool(self.lora), config.parallel.long_phase_timeout_s)  # LoRA: what trains
        self.reporter = Reporter(config.logging.report_to if self.layout.rank == 0 else "none",
                                 config.checkpoint.output_dir, config.to_keys())
        self.step_log = StepLog(self.log, self.reporter, config.logging.logging_steps, self.total_steps,
                                self.layout.world_size, device_peak_tflops(config.logging.peak_tflops))

    def resume(self) -> None:
        """The engine, optimizer, schedule and RNG states from the checkpoint to resume from, if any."""
        if self.resume_from is not None:
            self.progress.step = load(self.engine, self.resume_from, self.universal, trained_only=bool(self.lora))
            self.log.info(f"resumed from {self.resume_from} at step {self.progress.step}"
                          + (" (universal format)" if self.universal else ""))

    def record_run(self) -> None:
        """run_config.json (the resolved config, DeepSpeed json and optimizer groups) and the run's summary."""
        config = self.config
        self.log.write_json("run_config.json", {"config": config.to_keys(), "world_size": self.layout.world_size,
                                                "ds_config": self.ds_config,
                                                "optimizer_groups": optimizer_groups(self.engine)})
        if self.evaluator is not None:
            self.evaluator.settings = {"world_size": self.layout.world_size, **config.to_keys()}
        budget = config.batch.max_tokens_per_batch
        batch = f"token budget {budget}/micro-batch" if budget else f"global batch {self.plan.global_batch}"
        self.log.info(f"{len(self.train_set)} train samples, {batch}, {self.plan.steps_per_epoch} steps/epoch, "
                      f"{self.total_steps} steps")

    def loader_settings(self) -> tuple[int, int]:
        workers, prefetch, said = loader_settings(self.config, self.collator.dummy, self.encoder.image_token_id,
                                                  self.model_dtype)
        if said:
            self.log.info(said)  # rank 0's
        return workers, prefetch

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> None:
        config, progress = self.config, self.progress
        # the loader's workers fork before the progress bar starts tqdm's monitor thread: on Python 3.11 a fork
        # while another thread is being created can deadlock the child (seen at a02ac0c: the demo hung at step 0)
        workers, prefetch = self.loader_settings()
        loader = iter(make_loader(self.train_set, self.plan, self.layout.dp_rank, progress.step, self.total_steps,
                                  self.collator, workers, prefetch))
        self.log.start_progress(self.total_steps, progress.step)
        self.step_log.restart_clock()
        while progress.step < self.total_steps:
            step = progress.step + 1
            lr = config.optim.lr * self.schedule(self.scheduler.last_epoch)  # the language tower's; others alike
            pending = self.train_step(loader, step)
            self.watchdog.phase("log")
            self.step_log.next(step, pending, lr, progress.skipped)  # the step before's line, summed by this one
            progress.step, last = step, step == self.total_steps
            stop = progress.after(pending, self.bad_records, config.optim.max_bad_steps, config.checkpoint.output_dir)
            save_now = config.checkpoint.save_steps and step % config.checkpoint.save_steps == 0 and not last
            eval_now = self.evaluator is not None and config.logging.eval_steps and \
                step % config.logging.eval_steps == 0 and not last
            if stop or save_now or eval_now or last:
                self.step_log.flush(progress.skipped)  # before a pause or a stop, so that the step's time is its own
            if isinstance(stop, Preempted):
                self.preempt()
            if stop:
                raise stop
            if save_now:
                self.save()
            if eval_now:
                self.evaluate()

    def train_step(self, loader, step: int) -> PendingStep:
        """Optimizer step `step` over this rank's micro-batches (bad records left out of them are named on its
        stderr); its all-reduce also sums the step log's held step's numbers (`carry`)."""
        self.watchdog.phase("data", step)
        micro: list[MicroBatch] = [next(loader) for _ in range(self.config.batch.grad_accum)]
        self.in_flight = tuple(record for mb in micro for record in mb.records)
        for message in (m for mb in micro for m in mb.bad):
            print(f"ds-vlm rank {self.layout.rank}: step {step}: left out a bad record: {message}", file=sys.stderr,
                  flush=True)
        return self.runner.start(micro, with_stats=self.step_log.wants(step), stop_requested=self.signals.requested,
                                 bad_records=sum(len(mb.bad) for mb in micro), carry=self.step_log.carry())

    def preempt(self) -> None:
        """Every rank: the step is done and logged; checkpoint it, say so, and stop (exit PREEMPTED_EXIT)."""
        saved = self.save()
        step = self.progress.step
        self.log.event({"event": "preempted", "step": step, "checkpoint_saved": saved})
        self.log.close()
        raise Preempted(f"preempted after step {step}: " + (f"checkpoint {self.checkpointer.path(step)} "
                        "written; run the same command to resume" if saved else "the checkpoint FAILED"))

    def save(self) -> bool:
        self.watchdog.phase("checkpoint")
        step = self.progress.step
        ok, error = self.checkpointer.save(self.engine, step, self.run_meta, self.loaded.processor)
        path = str(self.checkpointer.path(step))
        self.log.event({"event": "checkpoint", "step": step, "path": path} if ok else
                       {"event": "checkpoint_failed", "step": step, "error": error})
        self.log.info(f"saved {path}" if ok else f"checkpoint at step {step} FAILED ({error}); earlier checkpoints "
                                                 f"are intact")
        self.step_log.restart_clock()
        return ok

    def evaluate(self) -> dict:
        self.watchdog.phase("eval")
        step = self.progress.step
        result, answers = self.evaluator(step)
        self.log.event({"event": "eval", "step": step, **result})
        self.reporter.log(step, result)
        self.log.draw_curves()  # with this evaluation's scores: its report embeds them
        if answers is not None:
            self.evaluator.write(answers)
        self.log.info(f"step {step}: eval loss {result['eval_loss']:.4f}" + (
            f", exact match {result['exact_match']:.1%}, chrF {result['chrf']:.1f}, report "
            f"{os.path.join(self.config.checkpoint.output_dir, 'eval', f'step_{step}.html')}"
            if "exact_match" in result else ""))
        self.step_log.restart_clock()
        return result

    # -- the end ----------------------------------------------------------------------------------
    def finish(self) -> dict:
        out_dir = self.config.checkpoint.output_dir
        result = {"steps": self.total_steps}
        if self.evaluator is not None:
            result.update(self.evaluate())
        saved = self.save()
        if self.config.checkpoint.export_hf:
            self.watchdog.phase("export")
            export_hf(self.engine, self.loaded.processor, os.path.join(out_dir, "hf"), self.lora,
                      self.config.parallel.long_phase_timeout_s)
            self.log.info(f"exported {os.path.join(out_dir, 'hf')}")
        self.log.close()
        self.reporter.close()
        if self.evaluator is None:  # an evaluation drew them last (the events since are not plotted)
            self.log.draw_curves()
        self.watchdog.phase(None)
        if not saved:
            raise RuntimeError(f"the final checkpoint (step {self.total_steps}) could not be written; see "
                               "metrics.jsonl")
        return result


def run(config: TrainConfig) -> dict:
    """The verbs in order. An exception on this rank is said with its phase, step and records, and told to the
    other ranks (faults.Watchdog.failed), which then stop within seconds; the caller must end the process with
    os._exit (launch/train.py, cli.entry): its DataLoader workers are not waited for."""
    trainer = Trainer(config)
    trainer.setup_distributed()
    try:
        trainer.open_data()
        trainer.setup_model()
        trainer.setup_data()
        trainer.setup_engine()
        trainer.resume()
        trainer.record_run()
        trainer.train()
        return trainer.finish()
    except AGREED_STOPS:
        raise
    except Exception as err:
        if trainer.layout.world_size > 1 or trainer.in_flight:
            trainer.watchdog.failed(err, trainer.in_flight)
        raise
    finally:
        if getattr(trainer, "log", None) is not None:  # a run that raises leaves metrics.jsonl closed
            trainer.log.close()
