"""One typed run config: YAML file + command-line flags (flags win), validated once."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = field(default="", metadata={"help": "local folder or hub id of a supported VLM"})
    train_data: str = field(default="", metadata={"help": "JSONL/JSON/parquet file with the training records"})
    eval_data: str = field(default="", metadata={"help": "optional held-out records; eval loss at the end"})
    data_format: str = field(default="auto", metadata={"help": "auto | sharegpt | llava | messages | openai: "
                                                               "force one record layout"})
    image_root: str = field(default="", metadata={"help": "folder relative image paths are resolved against "
                                                          "(default: the data file's folder)"})
    deepspeed: str = field(default="ds_configs/zero3.json", metadata={"help": "DeepSpeed json (ZeRO stage etc.)"})
    output_dir: str = field(default="runs/latest", metadata={"help": "metrics, checkpoints and hf/ go here"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the checkpoint"})
    # how long
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: run --epochs"})
    epochs: int = field(default=1, metadata={"help": "passes over train_data when max_steps is -1"})
    # batch
    micro_batch_size: int = field(default=1, metadata={"help": "samples per rank per forward"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int = field(default=4096, metadata={"help": "longest sample in tokens (image tokens included)"})
    truncation: str = field(default="error", metadata={"help": "error | skip | truncate: over-long samples stop the "
                                                               "run, are dropped, or are cut (never inside an image)"})
    max_tokens_per_batch: int = field(default=0, metadata={"help": "form micro-batches by this token budget "
                                                                   "(padded tokens) instead of --micro_batch_size"})
    min_pixels: int = field(default=0, metadata={"help": "smallest image area after resizing (0: processor's)"})
    max_pixels: int = field(default=0, metadata={"help": "largest image area after resizing (0: processor's)"})
    # optimizer and schedule
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps of linear warmup"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine decays to lr * this"})
    vision_lr: float = field(default=0.0, metadata={"help": "learning rate of the vision tower (0: --lr)"})
    projector_lr: float = field(default=0.0, metadata={"help": "learning rate of the projector (0: --lr)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on norms and biases)"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm; 0 disables"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where the GPU has it, else fp32) | bf16 | fp32"})
    loss: str = field(default="chunked", metadata={"help": "chunked | liger | full: cross-entropy on label rows "
                                                           "only, in chunks (liger: its fused kernel, CUDA); "
                                                           "full: all label rows' logits at once"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | sdpa | eager | flash_attention_2: "
                                                                       "the attention kernel (auto: fastest installed)"})
    # what trains
    train_vision: str = field(default="none", metadata={"help": "none | all | last:N vision blocks"})
    unfreeze_vision_layers: int = field(default=0, metadata={"help": "train the last N vision blocks "
                                                                     "(same as --train_vision last:N)"})
    train_projector: bool = field(default=True, metadata={"help": "train the vision-language merger/projector"})
    train_llm: bool = field(default=True, metadata={"help": "train the language tower"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "activation checkpointing on the "
                                                                         "language tower"})
    vision_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing (non-reentrant) "
                                                                        "on the vision tower's blocks"})
    # data handling
    bad_records: str = field(default="error", metadata={"help": "error | skip: what preflight does with bad records"})
    num_workers: int = field(default=1, metadata={"help": "DataLoader workers per rank for decoding/encoding"})
    # output
    save_steps: int = field(default=0, metadata={"help": "DeepSpeed checkpoint every N steps; 0: only at the end"})
    save_total_limit: int = field(default=0, metadata={"help": "keep only the newest K complete checkpoints (0: all)"})
    resume: str = field(default="auto", metadata={"help": "auto (newest complete checkpoint in output_dir, if any) "
                                                          "| none | PATH"})
    resume_ignore_config: bool = field(default=False, metadata={"help": "resume even if model, data, global batch "
                                                                        "or schedule changed"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many consecutive non-finite steps"})
    export_hf: bool = field(default=True, metadata={"help": "write OUTPUT_DIR/hf at the end"})
    eval_steps: int = field(default=0, metadata={"help": "eval loss and sample generations every N steps "
                                                         "(0: only at the end)"})
    eval_generate: int = field(default=8, metadata={"help": "eval records answered greedily at each evaluation, "
                                                            "written to samples.jsonl with exact-match accuracy"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb (if installed)"})
    peak_tflops: float = field(default=0.0, metadata={"help": "device peak TFLOP/s for MFU (0: known GPUs' "
                                                              "bf16 peak; none on CPU)"})
    logging_steps: int = field(default=1, metadata={"help": "progress-bar refresh interval in steps"})
    seed: int = 42
    dist_timeout_s: int = field(default=900, metadata={"help": "a collective that waits this long fails the run "
                                                              "(a hang turns into an error)"})

    @property
    def vision_blocks_to_train(self) -> Optional[int]:
        """None: no vision blocks; -1: all of the tower; N: the last N blocks."""
        if self.train_vision == "none":
            return self.unfreeze_vision_layers or None
        if self.train_vision == "all":
            return -1
        return int(self.train_vision.split(":", 1)[1])

    def validate(self, for_training: bool = True) -> "TrainConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        need(bool(self.model), "--model is required (a local folder or hub id)")
        need(bool(self.train_data), "--train_data is required")
        need(not for_training or Path(self.deepspeed).is_file(), f"--deepspeed {self.deepspeed}: no such file")
        need(self.micro_batch_size >= 1, "--micro_batch_size must be >= 1")
        need(self.grad_accum >= 1, "--grad_accum must be >= 1")
        need(self.max_steps > 0 or self.epochs >= 1, "give --max_steps N or --epochs N (>= 1)")
        need(self.lr > 0, "--lr must be > 0")
        need(0 <= self.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)")
        need(self.max_length >= 16, "--max_length must be >= 16")
        need(self.precision in ("auto", "bf16", "fp32"), "--precision must be auto, bf16 or fp32")
        need(self.loss in ("chunked", "liger", "full"), "--loss must be chunked, liger or full")
        need(self.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2"),
             "--attn_implementation must be auto, sdpa, eager or flash_attention_2")
        need(self.bad_records in ("error", "skip"), "--bad_records must be error or skip")
        need(self.truncation in ("error", "skip", "truncate"), "--truncation must be error, skip or truncate")
        need(self.data_format in ("auto", "sharegpt", "llava", "messages", "openai"),
             "--data_format must be auto, sharegpt, llava, messages or openai")
        need(self.max_tokens_per_batch == 0 or self.max_tokens_per_batch >= self.max_length,
             "--max_tokens_per_batch must be 0 (off) or >= --max_length, so every sample fits in a micro-batch")
        need(self.min_pixels >= 0 and self.max_pixels >= 0, "--min_pixels/--max_pixels must be >= 0")
        need(bool(re.fullmatch(r"none|all|last:[1-9]\d*", self.train_vision)),
             f"--train_vision {self.train_vision!r}: use none, all or last:N")
        need(self.unfreeze_vision_layers >= 0, "--unfreeze_vision_layers must be >= 0")
        need(not (self.unfreeze_vision_layers and self.train_vision != "none"),
             "--unfreeze_vision_layers and --train_vision both set; give one")
        need(self.num_workers >= 0, "--num_workers must be >= 0")
        need(self.report_to in ("none", "tensorboard", "wandb"), "--report_to must be none, tensorboard or wandb")
        need(self.eval_steps >= 0 and self.eval_generate >= 0, "--eval_steps/--eval_generate must be >= 0")
        need(self.save_total_limit >= 0 and self.save_steps >= 0, "--save_steps and --save_total_limit must be >= 0")
        need(self.max_bad_steps >= 1, "--max_bad_steps must be >= 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _str2bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(f) -> type:
    return f.type if isinstance(f.type, type) else eval(f.type)  # annotations are strings here


def _coerce(key: str, value, source: str):
    """YAML reads 2e-5 as a string and `true` as a bool; bring each value to its field's type."""
    kind = _field_type(next(f for f in fields(TrainConfig) if f.name == key))
    try:
        return _str2bool(value) if kind is bool else kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{source}: {key}: {value!r} is not a valid {kind.__name__}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Supervised fine-tuning of vision-language models on DeepSpeed.")
    parser.add_argument("--config", help="YAML file with the same keys as the flags; flags win")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    for f in fields(TrainConfig):
        kind = _field_type(f)
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True,
                                default=argparse.SUPPRESS, metavar="true|false", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, help=help_text)
    return parser


def load_config(argv: Optional[list[str]] = None, add_arguments=None):
    """YAML (if --config) then explicit flags; unknown YAML keys are errors.

    With `add_arguments(parser)` (tools that take the trainer's flags plus their own), returns
    (config, {extra flag: value}) and does not require the DeepSpeed json."""
    parser = build_parser()
    if add_arguments is not None:
        add_arguments(parser)
    args = vars(parser.parse_args(argv))
    names = {f.name for f in fields(TrainConfig)}
    extras = {k: args.pop(k) for k in list(args) if k not in names and k not in ("config", "local_rank")}
    values: dict = {}
    config_file = args.pop("config", None)
    args.pop("local_rank", None)
    if config_file:
        with open(config_file) as f:
            loaded = yaml.safe_load(f) or {}
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"{config_file}: unknown key(s) {unknown}; known keys are the flags of launch/train.py")
        values.update({key: _coerce(key, value, config_file) for key, value in loaded.items()})
    values.update(args)
    try:
        config = TrainConfig(**values)
    except TypeError as err:
        raise ConfigError(str(err)) from err
    if add_arguments is None:
        return config.validate()
    return config.validate(for_training=False), extras
