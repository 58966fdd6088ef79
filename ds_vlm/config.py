"""One typed run config: YAML file + command-line flags (flags win), validated once.

Every key is a field of `TrainConfig` with its type, default and help; a `Literal[...]` type is the one
place its allowed values are listed. `python -m ds_vlm.config` prints the flag table of docs/training.md
(`--update docs/training.md` rewrites it there).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _key(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = _key("", "local folder or hub id of a supported VLM")
    train_data: str = _key("", "JSONL / JSON / parquet files or folders, comma-separated; `path:weight` samples "
                               "sources by weight")
    eval_data: str = _key("", "held-out records: eval loss (and sample answers) at --eval_steps and at the end")
    data_format: Literal["auto", "sharegpt", "llava", "messages", "openai", "swift", "alpaca"] = _key(
        "auto", "force one record layout (records in another are named as bad)")
    image_root: str = _key("", "folder relative image paths are resolved against (default: the data file's folder)")
    deepspeed: str = _key("ds_configs/zero3.json", "the DeepSpeed json (ZeRO stage and its settings)")
    output_dir: str = _key("runs/latest", "metrics, checkpoints and hf/ go here")
    trust_remote_code: bool = _key(False, "allow model code from the checkpoint")
    # how long
    max_steps: int = _key(-1, "optimizer steps; -1: run --epochs")
    epochs: int = _key(1, "passes over the data when --max_steps is -1")
    # batches
    micro_batch_size: int = _key(1, "samples per rank per forward")
    grad_accum: int = _key(1, "micro-batches per optimizer step")
    max_length: int = _key(4096, "longest sample in tokens, image tokens included")
    truncation: Literal["error", "skip", "truncate"] = _key(
        "error", "over-long samples stop the run before training, are dropped (counted), or are cut (never inside "
                 "an image, never to zero answer tokens)")
    max_tokens_per_batch: int = _key(0, "form micro-batches by this budget of computed tokens (padded ones; with "
                                        "--packing, real ones) instead of --micro_batch_size; 0: off")
    sequence_parallel: int = _key(1, "split every sequence over groups of N ranks (Ulysses); data parallel over "
                                     "the groups; 1: off")
    packing: bool = _key(False, "each micro-batch is one row of its samples, no padding; attention stays inside "
                                "each sample (the sample boundaries go to a varlen kernel, never a mask)")
    min_pixels: int = _key(0, "smallest image area after resizing (0: the processor's)")
    max_pixels: int = _key(0, "largest image area after resizing (0: the processor's)")
    video_fps: float = _key(2.0, "frames sampled per second of video")
    video_max_frames: int = _key(32, "at most this many frames per video (spread over it when longer)")
    video_max_pixels: int = _key(0, "largest frame area after resizing (0: the video processor's)")
    # optimizer and schedule
    lr: float = _key(2e-5, "peak learning rate")
    warmup_ratio: float = _key(0.03, "linear warmup, as a fraction of all steps")
    min_lr_ratio: float = _key(0.0, "cosine decays to lr x this")
    vision_lr: float = _key(0.0, "learning rate of the vision tower (0: --lr)")
    projector_lr: float = _key(0.0, "learning rate of the projector (0: --lr)")
    weight_decay: float = _key(0.0, "AdamW weight decay; never on norms, biases or other 1-d tensors")
    adam_beta1: float = _key(0.9, "AdamW beta1")
    adam_beta2: float = _key(0.999, "AdamW beta2")
    adam_eps: float = _key(1e-8, "AdamW epsilon")
    grad_clip: float = _key(1.0, "clip the global gradient norm; 0 disables")
    precision: Literal["auto", "bf16", "fp32"] = _key("auto", "auto: bf16 where the GPU has it, else fp32")
    loss: Literal["chunked", "liger", "full"] = _key(
        "chunked", "cross-entropy on label rows only, in chunks; liger: liger-kernel's fused kernel (CUDA); full: "
                   "all label rows' logits at once")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "varlen"] = _key(
        "auto", "the attention kernel; auto: flash_attention_2 on a GPU with flash-attn installed; else with "
                "--packing the varlen interface (PyTorch's varlen kernel on a GPU, sdpa per sample on a CPU), without "
                "it sdpa (docs/training.md: which kernel each machine gets)")
    # what trains
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
    lora_bits: Literal[0, 4] = _key(0, "4: QLoRA, the frozen weights in 4 bits (bitsandbytes, a GPU, not ZeRO-3)")
    gradient_checkpointing: bool = _key(True, "activation checkpointing (non-reentrant) on the language tower")
    vision_checkpointing: bool = _key(False, "activation checkpointing (non-reentrant) on the vision blocks")
    # data handling
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
    # output
    save_steps: int = _key(0, "checkpoint every N steps (always one at the end)")
    save_total_limit: int = _key(0, "keep only the newest K complete checkpoints (0: all)")
    resume: str = _key("auto", "auto: the newest complete checkpoint in output_dir, else start fresh; none; or a "
                               "checkpoint path")
    resume_ignore_config: bool = _key(False, "resume even though model, data, global batch or schedule changed")
    max_bad_steps: int = _key(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    export_hf: bool = _key(True, "write OUTPUT_DIR/hf/ at the end")
    logging_steps: int = _key(1, "a metrics.jsonl line and a progress-bar update every N steps (the step's numbers "
                                 "are read from the device only then)")
    eval_steps: int = _key(0, "eval loss and sample answers every N steps (0: only at the end; needs eval_data)")
    eval_generate: int = _key(8, "eval records answered greedily at each evaluation -> samples.jsonl, exact-match "
                                 "accuracy")
    report_to: Literal["none", "tensorboard", "wandb"] = _key("none", "also log to this (if its package is installed)")
    peak_tflops: float = _key(0.0, "device peak TFLOP/s for MFU (0: the bf16 peak of known GPUs; none on CPU)")
    seed: int = _key(42, "data order and initialisation")
    dist_timeout_s: int = _key(900, "a rank stuck this long in one phase (data, forward, backward, step, "
                                    "checkpoint) ends the run, naming the rank that holds it up; also bounds the "
                                    "rendezvous and every collective")

    @property
    def loader_workers(self) -> int:
        """--num_workers, with -1 resolved from the cores this local rank has."""
        if self.num_workers >= 0:
            return self.num_workers
        from .distributed import default_loader_workers

        return default_loader_workers()

    @property
    def vision_blocks_to_train(self) -> Optional[int]:
        """None: no vision blocks; -1: all of the tower; N: the last N blocks."""
        if self.train_vision == "none":
            return None
        if self.train_vision == "all":
            return -1
        return int(self.train_vision.split(":", 1)[1])

    def validate(self, for_training: bool = True) -> "TrainConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        for name, choices in choice_fields().items():
            need(getattr(self, name) in choices,
                 f"--{name} {getattr(self, name)!r}: must be one of {', '.join(map(str, choices))}")
        need(bool(self.model), "--model is required (a local folder or hub id)")
        need(bool(self.train_data), "--train_data is required")
        need(not for_training or Path(self.deepspeed).is_file(), f"--deepspeed {self.deepspeed}: no such file")
        need(self.micro_batch_size >= 1, "--micro_batch_size must be >= 1")
        need(self.grad_accum >= 1, "--grad_accum must be >= 1")
        need(self.max_steps > 0 or self.epochs >= 1, "give --max_steps N or --epochs N (>= 1)")
        need(self.lr > 0, "--lr must be > 0")
        need(0 <= self.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)")
        need(self.max_length >= 16, "--max_length must be >= 16")
        need(self.max_tokens_per_batch == 0 or self.max_tokens_per_batch >= self.max_length,
             "--max_tokens_per_batch must be 0 (off) or >= --max_length, so every sample fits in a micro-batch")
        need(self.min_pixels >= 0 and self.max_pixels >= 0, "--min_pixels/--max_pixels must be >= 0")
        need(self.video_fps > 0 and self.video_max_frames >= 2 and self.video_max_pixels >= 0,
             "--video_fps must be > 0, --video_max_frames >= 2, --video_max_pixels >= 0")
        need(bool(re.fullmatch(r"none|all|last:[1-9]\d*", self.train_vision)),
             f"--train_vision {self.train_vision!r}: use none, all or last:N")
        need(self.num_workers >= -1, "--num_workers must be >= 0, or -1 (from the cores)")
        need(bool(re.fullmatch(r"cached|full|off|sample:[1-9]\d*", self.preflight)),
             f"--preflight {self.preflight!r}: use cached, full, off or sample:N")
        need(self.max_bad >= 0, "--max_bad must be >= 0")
        need(not self.max_tokens_per_batch or self.preflight in ("cached", "full"),
             "--max_tokens_per_batch needs every record's length: use --preflight cached or full")
        need(self.eval_steps >= 0 and self.eval_generate >= 0, "--eval_steps/--eval_generate must be >= 0")
        need(self.save_total_limit >= 0 and self.save_steps >= 0, "--save_steps and --save_total_limit must be >= 0")
        need(self.max_bad_steps >= 1, "--max_bad_steps must be >= 1")
        need(self.logging_steps >= 1, "--logging_steps must be >= 1")
        need(self.sequence_parallel >= 1, "--sequence_parallel must be >= 1")
        need(self.lora_rank >= 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
             "--lora_rank must be >= 0, --lora_alpha > 0, --lora_dropout in [0, 1)")
        need(not self.lora_bits or self.lora_rank, "--lora_bits 4 needs --lora_rank > 0 (QLoRA trains LoRA adapters)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Old names users may have in their YAML files or scripts: key -> (key it sets, how its value maps).
ALIASES = {
    "unfreeze_vision_layers": ("train_vision", lambda n: f"last:{int(n)}" if int(n) > 0 else "none"),
}


def field_types() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def choice_fields() -> dict[str, tuple[str, ...]]:
    """Fields with a fixed set of values (their Literal type), and those values."""
    return {name: typing.get_args(kind) for name, kind in field_types().items()
            if typing.get_origin(kind) is Literal}


def _str2bool(text) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(kind):
    if kind is bool:
        return _str2bool
    if typing.get_origin(kind) is Literal:
        return type(typing.get_args(kind)[0])  # the values' type (str, or int for --lora_bits)
    return kind


def _coerce(key: str, value, source: str):
    """YAML reads 2e-5 as a string and `true` as a bool; bring each value to its field's type."""
    kind = field_types()[key]
    try:
        return _converter(kind)(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{source}: {key}: {value!r} is not a valid {getattr(kind, '__name__', kind)}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Supervised fine-tuning of vision-language models on DeepSpeed.")
    parser.add_argument("--config", help="YAML file with the same keys as the flags; flags win")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    types = field_types()
    for f in fields(TrainConfig):
        kind = types[f.name]
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=_str2bool, nargs="?", const=True,
                                default=argparse.SUPPRESS, metavar="true|false", help=help_text)
        else:
            choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
            parser.add_argument(f"--{f.name}", type=_converter(kind), default=argparse.SUPPRESS,
                                metavar="|".join(map(str, choices)) if choices else None, help=help_text)
    for alias, (target, _) in ALIASES.items():
        parser.add_argument(f"--{alias}", default=argparse.SUPPRESS, help=f"old name: sets --{target}")
    return parser


def _merge(args: dict) -> TrainConfig:
    """YAML (if --config) then explicit flags; unknown YAML keys are errors; aliases map to their key."""
    values: dict = {}
    config_file = args.pop("config", None)
    args.pop("local_rank", None)
    known = {f.name for f in fields(TrainConfig)}
    if config_file:
        with open(config_file) as f:
            loaded = yaml.safe_load(f) or {}
        unknown = sorted(set(loaded) - known - set(ALIASES))
        if unknown:
            raise ConfigError(f"{config_file}: unknown key(s) {unknown}; known keys are the flags of launch/train.py")
        values.update(_resolve_aliases(loaded, config_file))
        values = {key: _coerce(key, value, config_file) for key, value in values.items()}
    values.update(_resolve_aliases(args, "command line"))
    return TrainConfig(**values)


def _resolve_aliases(values: dict, source: str) -> dict:
    out = {k: v for k, v in values.items() if k not in ALIASES}
    for alias, (target, convert) in ALIASES.items():
        if alias in values:
            if target in values:
                raise ConfigError(f"{source}: --{alias} and --{target} both set; give one (--{alias} is the old "
                                  f"name of --{target})")
            try:
                out[target] = convert(values[alias])
            except ValueError as err:
                raise ConfigError(f"{source}: {alias}: {values[alias]!r} is not valid") from err
    return out


def load_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """The trainer's config from --config YAML and flags, validated for training."""
    return _merge(vars(build_parser().parse_args(argv))).validate()


def load_tool_config(argv: Optional[list[str]], add_arguments) -> tuple[TrainConfig, dict]:
    """For tools that take the trainer's flags plus their own (`add_arguments(parser)`): (config, their
    values). The DeepSpeed json is not required."""
    parser = build_parser()
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    names = {f.name for f in fields(TrainConfig)} | set(ALIASES) | {"config", "local_rank"}
    extras = {k: args.pop(k) for k in list(args) if k not in names}
    return _merge(args).validate(for_training=False), extras


def flag_table() -> str:
    """The markdown table of every key (docs/training.md holds this output; a test keeps them equal)."""
    types = field_types()
    rows = ["| flag / key | default | values | meaning |", "|---|---|---|---|"]
    for f in fields(TrainConfig):
        kind = types[f.name]
        values = (", ".join(map(str, typing.get_args(kind))) if typing.get_origin(kind) is Literal
                  else getattr(kind, "__name__", str(kind)))
        default = f"`{f.default}`" if f.default != "" else ""
        rows.append(f"| `{f.name}` | {default} | {values} | {f.metadata.get('help', '')} |")
    for alias, (target, _) in ALIASES.items():
        rows.append(f"| `{alias}` | | int | old name: N sets `{target}` to `last:N` |")
    return "\n".join(rows)


def update_flag_table(path: str) -> None:
    """Replace the table between the flag markers of a markdown file with `flag_table()`."""
    text = Path(path).read_text()
    begin, end = "<!-- flags:begin -->\n", "\n<!-- flags:end -->"
    head, rest = text.split(begin, 1)
    Path(path).write_text(head + begin + flag_table() + end + rest.split(end, 1)[1])


if __name__ == "__main__":  # python -m ds_vlm.config [--update docs/training.md]
    if sys.argv[1:2] == ["--update"]:
        update_flag_table(sys.argv[2])
    else:
        sys.stdout.write(flag_table() + "\n")
