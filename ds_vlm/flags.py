"""The run config from the command line and a YAML file (flags win), for the trainer and the tools that take its
flags: one argparse flag per config key (ds_vlm/config.py), old key names mapped to their new ones, YAML values
brought to their key's type. `python -m ds_vlm.flags` prints the flag table of docs/training.md (`--update
docs/training.md` rewrites it there)."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Literal, Optional

import yaml

from ds_vlm.config import ConfigError, TrainConfig, config_keys, key_table

# Old names users may have in their YAML files or scripts: key -> (key it sets, how its value maps).
ALIASES = {
    "unfreeze_vision_layers": ("train_vision", lambda n: f"last:{int(n)}" if int(n) > 0 else "none"),
}



def _str2bool(text) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(f, kind):
    """How the field `f` of type `kind` reads a flag or YAML value."""
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    if kind is bool:
        return _str2bool
    if typing.get_origin(kind) is Literal:
        return type(typing.get_args(kind)[0])  # the values' type (str, or int for --lora_bits)
    return kind


def _coerce(key: str, value, source: str):
    """YAML reads 2e-5 as a string and `true` as a bool; bring each value to its key's type."""
    f, kind = next((k.field, k.kind) for k in config_keys() if k.key == key)
    try:
        return _converter(f, kind)(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{source}: {key}: {value!r} is not a valid {_values(f, kind)}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Supervised fine-tuning of vision-language models on DeepSpeed.")
    parser.add_argument("--config", help="YAML file with the same keys as the flags; flags win")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    for entry in config_keys():
        key, f, kind = entry.key, entry.field, entry.kind
        help_text = (f.metadata.get("help", "") + f" (default: {f.default})").replace("%", "%%")  # argparse formats
        if kind is bool:
            parser.add_argument(f"--{key}", type=_str2bool, nargs="?", const=True,
                                default=argparse.SUPPRESS, metavar="true|false", help=help_text)
        else:
            allowed = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
            parser.add_argument(f"--{key}", type=_converter(f, kind), default=argparse.SUPPRESS,
                                metavar="|".join(map(str, allowed)) if allowed else None, help=help_text)
    for alias, (target, _) in ALIASES.items():
        parser.add_argument(f"--{alias}", default=argparse.SUPPRESS, help=f"old name: sets --{target}")
    return parser


def _merge(args: dict) -> TrainConfig:
    """YAML (if --config) then explicit flags; unknown YAML keys are errors; aliases map to their key."""
    values: dict = {}
    config_file = args.pop("config", None)
    args.pop("local_rank", None)
    known = set(key_table())
    if config_file:
        with open(config_file) as f:
            loaded = yaml.safe_load(f) or {}
        unknown = sorted(set(loaded) - known - set(ALIASES))
        if unknown:
            raise ConfigError(f"{config_file}: unknown key(s) {unknown}; known keys are the flags of launch/train.py")
        values.update(_resolve_aliases(loaded, config_file))
        values = {key: _coerce(key, value, config_file) for key, value in values.items()}
    values.update(_resolve_aliases(args, "command line"))
    return TrainConfig.from_keys(**values)


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


def load_tool_config(argv: Optional[list[str]], add_arguments, needs_data: bool = True) -> tuple[TrainConfig, dict]:
    """For tools that take the trainer's flags plus their own (`add_arguments(parser)`): (config, their
    values). The DeepSpeed json is not required (nor --train_data, for a tool that plans without data)."""
    parser = build_parser()
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    names = set(key_table()) | set(ALIASES) | {"config", "local_rank"}
    extras = {k: args.pop(k) for k in list(args) if k not in names}
    return _merge(args).validate(for_training=False, needs_data=needs_data), extras


def _values(f, kind) -> str:
    """What a key takes, as the docs and errors name it."""
    if f.metadata.get("values"):
        return f.metadata["values"]
    if typing.get_origin(kind) is Literal:
        return ", ".join(map(str, typing.get_args(kind)))
    return getattr(kind, "__name__", str(kind))


def flag_table() -> str:
    """The markdown table of every key (docs/training.md holds this output; a test keeps them equal)."""
    rows = ["| flag / key | section | default | values | meaning |", "|---|---|---|---|---|"]
    for k in config_keys():
        default = f"`{k.field.default}`" if k.field.default != "" else ""
        rows.append(f"| `{k.key}` | {k.section or 'run'} | {default} | {_values(k.field, k.kind)} | "
                    f"{k.field.metadata.get('help', '')} |")
    for alias, (target, _) in ALIASES.items():
        rows.append(f"| `{alias}` | | | int | old name: N sets `{target}` to `last:N` |")
    return "\n".join(rows)


def update_flag_table(path: str) -> None:
    """Replace the table between the flag markers of a markdown file with `flag_table()`."""
    text = Path(path).read_text()
    begin, end = "<!-- flags:begin -->\n", "\n<!-- flags:end -->"
    head, rest = text.split(begin, 1)
    Path(path).write_text(head + begin + flag_table() + end + rest.split(end, 1)[1])


if __name__ == "__main__":  # python -m ds_vlm.flags [--update docs/training.md]
    if sys.argv[1:2] == ["--update"]:
        update_flag_table(sys.argv[2])
    else:
        sys.stdout.write(flag_table() + "\n")
