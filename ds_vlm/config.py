"""One typed run config, in sections, validated once (read from a YAML file and flags by ds_vlm/flags.py).

Users type flat keys (`--lr`, `lr:` in YAML); each key is a field of one section, which is what a
component is given (`encoder_for(..., config.data)`, `param_groups(..., config.optim)`):

    data        the records, their layout, images and videos, preflight, the loader
    batch       micro-batches, accumulation, token budgets, packing, how long
    model       what is loaded, how it computes, what trains (LoRA included)
    optim       AdamW, the schedule, clipping, non-finite steps
    parallel    the DeepSpeed json, sequence parallelism, timeouts
    checkpoint  where the run writes, saving, resuming, the export
    logging     metrics, evaluation, reporters, MFU

A `Literal[...]` type is the one place its allowed values are listed (the modules that need them take them
from here: `choices("data_format")`). `to_keys()` gives the flat keys back, as run_config.json and
checkpoints record them (checkpoints written before the sections resume the same way). The command line and
YAML layer (the parser, old key names, the flag table of docs/training.md) is ds_vlm/flags.py.
"""

from __future__ import annotations

import re
import typing
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _key(default, help: str, key: str = "", parse=None, values: str = ""):
    """A config field; `key`: the flag / YAML key when it is not the field's own name; `parse`: how a flag or
    YAML value becomes the field's value when its type alone does not say (`values`: how the docs name them)."""
    return field(default=default, metadata={"help": help, "key": key, "parse": parse, "values": values})


DataFormat = Literal["auto", "sharegpt", "llava", "messages", "openai", "mantis", "gemini", "bedrock", "swift",
                     "alpaca", "prompt_completion", "cauldron", "caption"]
Truncation = Literal["error", "skip", "truncate"]
LossKind = Literal["chunked", "liger", "full"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2", "varlen"]
PREFLIGHT = re.compile(r"cached|full|off|sample:([1-9]\d*)")
AUTO_BUDGET = -1  # --max_tokens_per_batch auto, until the trainer resolves it


def token_budget(value) -> int:
    """--max_tokens_per_batch: a number of tokens, or `auto` (AUTO_BUDGET)."""
    return AUTO_BUDGET if str(value).strip().lower() == "auto" else int(value)



@dataclass
class DataConfig:
    train_data: str = _key("", "SOURCE[#SELECTOR][:WEIGHT],...: JSONL / JSON / parquet files or folders, hf:ORG/NAME, "
                               "a dataset_info.json#NAME, an InternVL meta JSON, a LLaVA-NeXT YAML (docs/data.md)")
    eval_data: str = _key("", "held-out records: eval loss (and sample answers) at --eval_steps and at the end")
    data_format: DataFormat = _key("auto", "force one record layout (records in another are named as bad)")
    image_root: str = _key("", "folder relative image paths are resolved against (default: the data file's folder)")
    caption_prompt: str = _key("", "caption pairs ({image, caption}): the user text after the image (default none: "
                                   "the image alone, as in LLaVA's alignment pretraining)")
    max_length: int = _key(4096, "longest sample in tokens, image tokens included")
    truncation: Truncation = _key(
        "error", "over-long samples stop the run before training, are dropped (counted), or are cut (never inside "
                 "an image, never to zero answer tokens)")
    min_pixels: int = _key(0, "smallest image area after resizing (0: the processor's)")
    max_pixels: int = _key(0, "largest image area after resizing (0: the processor's)")
    video_fps: float = _key(2.0, "frames sampled per second of video")
    video_max_frames: int = _key(32, "at most this many frames per video (spread over it when longer)")
    video_max_pixels: int = _key(0, "largest frame area after resizing (0: the video processor's)")
    bad_records: Literal["error", "skip"] = _key("error", "bad records stop the run before training, or are "
                                                          "dropped and counted")
    preflight: str = _key("cached", "cached: every record checked before training, results kept in the data cache "
                                    "and reused while file, processor and encoding flags are unchanged; full: "
                                    "check again; sample:N: N random records per file, the rest estimated; off: "
                                    "none (records found bad in training are skipped and counted)")
    max_bad: int = _key(0, "with --preflight off or sample:N, records found bad in training are skipped, named and "
                           "counted; more than this many stop the run (validate: more than this many bad fail)")
    data_cache: str = _key("", "folder of the data cache (JSON-list indexes, preflight results); default "
                               "$DS_VLM_CACHE or ~/.cache/ds_vlm")
    num_workers: int = _key(-1, "DataLoader workers per rank (image decoding, processor); -1: from the cores per "
                                "local rank (on a GPU one core left for the rank itself, at most 8; on a CPU 1)")

    @property
    def loader_workers(self) -> int:
        """--num_workers, with -1 resolved from the cores this local rank has."""
        if self.num_workers >= 0:
            return self.num_workers
        from ds_vlm.runtime.distributed import default_loader_workers

        return default_loader_workers()


@dataclass
class BatchConfig:
    max_steps: int = _key(-1, "optimizer steps; -1: run --epochs")
    epochs: int = _key(1, "passes over the data when --max_steps is -1")
    micro_batch_size: int = _key(1, "samples per rank per forward")
    grad_accum: int = _key(1, "micro-batches per optimizer step")
    max_tokens_per_batch: int = _key(0, "form micro-batches by this budget of computed tokens (padded ones; with "
                                        "--packing, real ones) instead of --micro_batch_size; 0: off; auto: the "
                                        "largest the planner finds fits the rank's memory with a 10% margin "
                                        "(resolved at start, recorded in run_config.json and checkpoints)",
                                     parse=token_budget, values="int or auto")
    plan_memory_gb: float = _key(0.0, "a rank's memory (GB) for --max_tokens_per_batch auto and the start-up plan "
                                      "line; 0: the GPU's (a CPU run needs it for auto)")
    packing: bool = _key(False, "each micro-batch is one row of its samples, no padding; attention stays inside "
                                "each sample (the sample boundaries go to a varlen kernel, never a mask)")


@dataclass
class ModelConfig:
    path: str = _key("", "local folder or hub id of a supported VLM", key="model")
    trust_remote_code: bool = _key(False, "allow model code from the checkpoint")
    precision: Literal["auto", "bf16", "fp32"] = _key("auto", "auto: bf16 where the GPU has it, else fp32")
    loss: LossKind = _key(
        "chunked", "cross-entropy on label rows only, in chunks; liger: liger-kernel's fused kernel (CUDA); full: "
                   "all label rows' logits at once")
    attn_implementation: Attention = _key(
        "auto", "the attention kernel; auto: flash_attention_2 on a GPU with flash-attn installed; else with "
                "--packing the varlen interface (PyTorch's varlen kernel on a GPU, sdpa per sample on a CPU), without "
                "it sdpa (docs/training.md: which kernel each machine gets)")
    train_vision: str = _key("none", "none, all, or last:N vision blocks (the last N whose output is used)")
    train_projector: bool = _key(True, "train the merger / multi-modal projector")
    train_llm: bool = _key(True, "train the language tower and LM head")
    lora_rank: int = _key(0, "LoRA rank R on the linear layers --lora_targets names in the parts that train; 0: "
                             "off (full fine-tuning)")
    lora_alpha: float = _key(16.0, "LoRA scaling: the update is B A x alpha / R")
    lora_dropout: float = _key(0.05, "dropout on the LoRA input")
    lora_targets: str = _key("default", "default (the language tower's attention and MLP projections), all-linear "
                                        "(every linear layer of a trained part but the LM head), or comma-separated "
                                        "module names / regular expressions on full names")
    lora_bits: Literal[0, 4] = _key(0, "4: QLoRA, the LLM's frozen linear weights in 4 bits (bitsandbytes, not ZeRO-3)")
    gradient_checkpointing: bool = _key(True, "activation checkpointing (non-reentrant) on the language tower")
    vision_checkpointing: bool = _key(False, "activation checkpointing (non-reentrant) on the vision blocks")

    @property
    def vision_blocks_to_train(self) -> Optional[int]:
        """None: no vision blocks; -1: all of the tower; N: the last N blocks."""
        if self.train_vision == "none":
            return None
        if self.train_vision == "all":
            return -1
        return int(self.train_vision.split(":", 1)[1])


@dataclass
class OptimConfig:
    optimizer: Literal["auto", "adamw", "muon"] = _key(
        "auto", "auto: the DeepSpeed json's optimizer type (AdamW when it names none); muon: DeepSpeed's Muon "
                "under ZeRO on the 2-D hidden weight matrices, AdamW on the rest (embeddings, LM head, norms, "
                "biases, the vision patch embedding; docs/training.md)")
    lr: float = _key(2e-5, "peak learning rate")
    warmup_ratio: float = _key(0.03, "linear warmup, as a fraction of all steps")
    min_lr_ratio: float = _key(0.0, "cosine decays to lr x this")
    vision_lr: float = _key(0.0, "learning rate of the vision tower (0: --lr)")
    projector_lr: float = _key(0.0, "learning rate of the projector (0: --lr)")
    weight_decay: float = _key(0.0, "AdamW weight decay; never on norms, biases or other 1-d tensors")
    adam_beta1: float = _key(0.9, "AdamW beta1")
    adam_beta2: float = _key(0.999, "AdamW beta2")
    adam_eps: float = _key(1e-8, "AdamW epsilon")
    muon_lr: float = _key(0.02, "Muon's peak learning rate on the language tower's matrices (vision and projector "
                                "matrices: this x --vision_lr / --lr and x --projector_lr / --lr)")
    muon_momentum: float = _key(0.95, "Muon's momentum (its one state per parameter)")
    grad_clip: float = _key(1.0, "clip the global gradient norm; 0 disables")
    max_bad_steps: int = _key(5, "stop after this many consecutive steps with a non-finite loss or gradient")


@dataclass
class ParallelConfig:
    deepspeed: str = _key("ds_configs/zero3.json", "the DeepSpeed json (ZeRO stage and its settings)")
    sequence_parallel: int = _key(1, "split every sequence over groups of N ranks (Ulysses); data parallel over "
                                     "the groups; 1: off")
    expert_parallel: int = _key(1, "split each MoE block's experts over groups of N ranks (DeepSpeed AutoEP; "
                                   "qwen3_vl_moe, qwen3_5_moe); the rest stays data-parallel under ZeRO; 1: off "
                                   "(or the json's expert_parallel section)")
    dist_timeout_s: int = _key(900, "a rank stuck this long in one phase (data, forward, backward, step, "
                                    "checkpoint) ends the run, naming the rank that holds it up; also bounds the "
                                    "rendezvous and every collective")
    long_phase_timeout_s: int = _key(7200, "a checkpoint, evaluation or export may take this long before the "
                                           "watchdog calls the run stuck (rank 0 writing a large model, a universal "
                                           "checkpoint conversion); the other ranks wait for it through the "
                                           "rendezvous store, not a collective with --dist_timeout_s")


@dataclass
class CheckpointConfig:
    output_dir: str = _key("runs/latest", "metrics, checkpoints and hf/ go here")
    save_steps: int = _key(0, "checkpoint every N steps (always one at the end)")
    save_total_limit: int = _key(0, "keep only the newest K complete checkpoints (0: all)")
    resume: str = _key("auto", "auto: the newest complete checkpoint in output_dir, else start fresh; none; or a "
                               "checkpoint path")
    resume_ignore_config: bool = _key(False, "resume even though model, data, global batch or schedule changed")
    export_hf: bool = _key(True, "write OUTPUT_DIR/hf/ at the end")


@dataclass
class LoggingConfig:
    logging_steps: int = _key(1, "a metrics.jsonl line and a progress-bar update every N steps (the step's numbers "
                                 "are read from the device only then)")
    eval_steps: int = _key(0, "eval loss and sample answers every N steps (0: only at the end; needs eval_data)")
    eval_generate: int = _key(8, "eval records answered greedily at each evaluation -> samples.jsonl, exact match, "
                                 "BLEU, chrF, ROUGE-L, OUTPUT_DIR/eval/step_N.html")
    report_to: Literal["none", "tensorboard", "wandb"] = _key("none", "also log to this (if its package is installed)")
    peak_tflops: float = _key(0.0, "device peak TFLOP/s for MFU (0: the bf16 peak of known GPUs; none on CPU)")
    plan_at_start: bool = _key(True, "rank 0 prints the planner's predicted peak memory per rank at start (its trace "
                                     "cached in the data cache; ds_vlm/memplan/planner.py)")
    measure_memory: bool = _key(False, "on a CPU, log peak_tensor_gb: the peak of live tensor bytes per logged step, "
                                       "from the allocator's events (slower steps; ds_vlm/runtime/memory.py). On CUDA "
                                       "peak_tensor_gb is max_memory_allocated, always")
    verbose: bool = _key(False, "DeepSpeed's INFO lines and every rank's warnings on the console (default: each "
                                "distinct warning once, by rank 0; known noise silenced: ds_vlm/runtime/console.py)")


SECTIONS = {"data": DataConfig, "batch": BatchConfig, "model": ModelConfig, "optim": OptimConfig,
            "parallel": ParallelConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = _key(42, "data order and initialisation")

    @classmethod
    def from_keys(cls, **keys) -> "TrainConfig":
        """A config from flat keys (what flags, YAML files and checkpoints hold); unknown keys are errors."""
        table = key_table()
        unknown = sorted(set(keys) - set(table))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown}; known keys are the flags of launch/train.py")
        sections: dict[str, dict] = {name: {} for name in SECTIONS}
        top = {}
        for key, value in keys.items():
            section, name = table[key]
            (sections[section] if section else top)[name] = value
        return cls(**{name: SECTIONS[name](**values) for name, values in sections.items()}, **top)

    def to_keys(self) -> dict:
        """The flat keys and their values (run_config.json, checkpoints, reporters)."""
        out = {}
        for key, (section, name) in key_table().items():
            out[key] = getattr(getattr(self, section) if section else self, name)
        return out

    def validate(self, for_training: bool = True, needs_data: bool = True) -> "TrainConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        data, batch, model, optim = self.data, self.batch, self.model, self.optim
        keys = self.to_keys()
        for key, allowed in choice_keys().items():
            need(keys[key] in allowed, f"--{key} {keys[key]!r}: must be one of {', '.join(map(str, allowed))}")
        need(bool(model.path), "--model is required (a local folder or hub id)")
        need(bool(data.train_data) or not needs_data, "--train_data is required")
        need(not for_training or Path(self.parallel.deepspeed).is_file(),
             f"--deepspeed {self.parallel.deepspeed}: no such file")
        need(batch.micro_batch_size >= 1, "--micro_batch_size must be >= 1")
        need(batch.grad_accum >= 1, "--grad_accum must be >= 1")
        need(batch.max_steps > 0 or batch.epochs >= 1, "give --max_steps N or --epochs N (>= 1)")
        need(optim.lr > 0, "--lr must be > 0")
        need(0 <= optim.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)")
        need(data.max_length >= 16, "--max_length must be >= 16")
        need(batch.max_tokens_per_batch in (0, AUTO_BUDGET) or batch.max_tokens_per_batch >= data.max_length,
             "--max_tokens_per_batch must be 0 (off), auto, or >= --max_length, so every sample fits in a "
             "micro-batch")
        need(batch.plan_memory_gb >= 0, "--plan_memory_gb must be >= 0")
        need(data.min_pixels >= 0 and data.max_pixels >= 0, "--min_pixels/--max_pixels must be >= 0")
        need(data.video_fps > 0 and data.video_max_frames >= 2 and data.video_max_pixels >= 0,
             "--video_fps must be > 0, --video_max_frames >= 2, --video_max_pixels >= 0")
        need(bool(re.fullmatch(r"none|all|last:[1-9]\d*", model.train_vision)),
             f"--train_vision {model.train_vision!r}: use none, all or last:N")
        need(data.num_workers >= -1, "--num_workers must be >= 0, or -1 (from the cores)")
        need(bool(PREFLIGHT.fullmatch(data.preflight)),
             f"--preflight {data.preflight!r}: use cached, full, off or sample:N")
        need(data.max_bad >= 0, "--max_bad must be >= 0")
        need(not batch.max_tokens_per_batch or data.preflight in ("cached", "full"),
             "--max_tokens_per_batch needs every record's length: use --preflight cached or full")
        need(self.logging.eval_steps >= 0 and self.logging.eval_generate >= 0,
             "--eval_steps/--eval_generate must be >= 0")
        need(self.checkpoint.save_total_limit >= 0 and self.checkpoint.save_steps >= 0,
             "--save_steps and --save_total_limit must be >= 0")
        need(optim.muon_lr > 0 and 0 <= optim.muon_momentum < 1, "--muon_lr must be > 0, --muon_momentum in [0, 1)")
        need(optim.max_bad_steps >= 1, "--max_bad_steps must be >= 1")
        need(self.logging.logging_steps >= 1, "--logging_steps must be >= 1")
        need(self.parallel.sequence_parallel >= 1, "--sequence_parallel must be >= 1")
        need(self.parallel.expert_parallel >= 1, "--expert_parallel must be >= 1")
        need(model.lora_rank >= 0 and model.lora_alpha > 0 and 0 <= model.lora_dropout < 1,
             "--lora_rank must be >= 0, --lora_alpha > 0, --lora_dropout in [0, 1)")
        need(not model.lora_bits or model.lora_rank, "--lora_bits 4 needs --lora_rank > 0 (QLoRA trains LoRA adapters)")
        return self


@dataclass(frozen=True)
class ConfigKey:
    """One flat key (a flag, a YAML key) and the dataclass field it sets."""
    key: str
    section: str      # '' for a top-level field of TrainConfig
    field: Field      # its default and metadata (help, values, parse)
    kind: type        # its resolved type


def config_keys() -> list[ConfigKey]:
    """Every key, in table order (sections, then top level)."""
    out = []
    for section, cls in SECTIONS.items():
        types = typing.get_type_hints(cls)
        out += [ConfigKey(f.metadata.get("key") or f.name, section, f, types[f.name]) for f in fields(cls)]
    types = typing.get_type_hints(TrainConfig)
    out += [ConfigKey(f.name, "", f, types[f.name]) for f in fields(TrainConfig) if f.name not in SECTIONS]
    return out


def key_table() -> dict[str, tuple[str, str]]:
    """key -> (section, field name); section '' for top-level fields."""
    return {k.key: (k.section, k.field.name) for k in config_keys()}


def field_types() -> dict[str, type]:
    """key -> its type."""
    return {k.key: k.kind for k in config_keys()}


def default_of(key: str):
    return next(k.field.default for k in config_keys() if k.key == key)


def choice_keys() -> dict[str, tuple]:
    """Keys with a fixed set of values (their Literal type), and those values."""
    return {key: typing.get_args(kind) for key, kind in field_types().items() if typing.get_origin(kind) is Literal}


def choices(key: str) -> tuple:
    """The allowed values of one key (the one source other modules take them from)."""
    return choice_keys()[key]
