"""Command-line front of the trainer: errors a user can fix print one clear line, not a traceback.

    ds-vlm train --config run.yaml [--flag value ...]      # one process, or under torchrun / deepspeed
    ds-vlm validate | plan | export | evaluate | demo | check-model [...]  # the tools
    ds-vlm VERB --help

`deepspeed --num_gpus 8 launch/train.py ...` stays the documented way to launch (the DeepSpeed launcher needs a
script); `ds-vlm train` is the same entry, with launch/train.py's teardown (see `entry`). The `ds-vlm-*`
commands (ds-vlm-validate, ...) stay as aliases.

Exit statuses: 0 done; 2 an error the message explains (config, data, too many bad records, rendezvous, divergence);
75 preempted (SIGTERM/SIGUSR1: a checkpoint was written; run the same command to resume); 3 the run hung
(a rank stopped responding: the watchdog names it); 130 interrupted (Ctrl-C: stopped at once, no checkpoint);
1 anything else (a traceback), and the ranks another rank's error stopped (they say which rank failed, in which
phase and on which records).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from ds_vlm.config import ConfigError
from ds_vlm.data.formats import DataError
from ds_vlm.flags import load_config


def main(argv=None) -> int:
    from ds_vlm.runtime.faults import PREEMPTED_EXIT, Preempted, exit_on_interrupt

    exit_on_interrupt()  # first: a Ctrl-C during the rendezvous or the model's loading ends the rank too
    from ds_vlm.data.containers import DataFileError
    from ds_vlm.data.preflight import BadDataError, TooManyBadRecords
    from ds_vlm.data.specs import SpecError
    from ds_vlm.runtime.distributed import RendezvousError
    from ds_vlm.train.progress import TrainingDiverged
    from ds_vlm.train.trainer import run

    try:
        config = load_config(argv)
        run(config)
    except Preempted as err:
        print(f"ds-vlm: {err} (exit {PREEMPTED_EXIT})", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except (ConfigError, DataError, BadDataError, TrainingDiverged, TooManyBadRecords, RendezvousError,
            FileNotFoundError, SpecError, DataFileError) as err:
        print(f"ds-vlm: error: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception:  # a traceback, then the caller's os._exit: a normal exit would wait for DataLoader workers
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


# verb -> (module:function, what it does); each function takes argv (the verb's flags) and returns the exit status
VERBS = {
    "train": ("ds_vlm.cli:main", "train (the trainer's flags, or --config F.yaml)"),
    "validate": ("ds_vlm.data.validate:main", "check a dataset with the model's processor before booking GPUs"),
    "export": ("ds_vlm.checkpoint.export:main", "a checkpoint -> a Hugging Face folder"),
    "evaluate": ("ds_vlm.eval.cli:main", "generate on records and score the answers"),
    "plan": ("ds_vlm.memplan.planner:main", "predict each GPU's peak memory and the step time from the model's config"),
    "demo": ("ds_vlm.demo:main", "build the tiny offline demo model and data"),
    "check-model": ("ds_vlm.models.check:main", "whether a model's architecture trains here: a tiny random copy, "
                                               "each check timed (about a minute on a CPU)"),
}


def dispatch(argv=None) -> int:
    """`ds-vlm VERB [flags]`: the verb's own main with the remaining flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        width = max(map(len, VERBS))
        lines = ["usage: ds-vlm VERB [flags]   (ds-vlm VERB --help for a verb's flags)", "", "verbs:"]
        lines += [f"  {verb:<{width}}  {what}" for verb, (_, what) in VERBS.items()]
        known = not argv or argv[0] in ("-h", "--help")
        print("\n".join(lines + ([] if known else ["", f"ds-vlm: error: unknown verb {argv[0]!r}"])),
              file=sys.stdout if known else sys.stderr)
        return 0 if known else 2
    target, _ = VERBS[argv[0]]
    module, function = target.split(":")
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)


def entry() -> None:
    """The `ds-vlm` console script. A training run ends with os._exit, as launch/train.py does: at interpreter
    teardown a DeepSpeed/gloo thread occasionally aborts a finished run ("terminate called without an active
    exception", exit 250); the other verbs exit normally."""
    code = dispatch()
    if sys.argv[1:2] == ["train"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
