"""What a run says on the console, outside the metrics log: one-line notices, once, by rank 0; and the one
place that decides which warnings and library log lines reach the console (`quiet_console`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_said: set[str] = set()

# Known noise: (category, message regex, why it is silenced). Anything else is shown, once, by rank 0.
KNOWN_NOISE = (
    (FutureWarning, r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
     "DeepSpeed's ZeRO calls torch.distributed's old names; nothing a user can change, once per rank per call site"),
    (UserWarning, r".*No CUDA runtime is found",
     "torch's CUDA extension loader on a CPU machine (DeepSpeed's op builders import it)"),
    (UserWarning, r".*[Ss]etting accelerator to CPU",
     "DeepSpeed on a machine without a GPU; the run's own first line says which device it uses"),
    (UserWarning, r".*`base_model_name_or_path`.*",
     "peft's notice about a renamed config field, on every adapter it builds"),
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated.*",
     "transformers' old name, called by peft on every adapter it builds"),
    (UserWarning, r".*torch\.utils\.checkpoint: the use_reentrant parameter.*",
     "transformers' checkpointing wrapper; ds-vlm passes use_reentrant explicitly"),
)


def say_once(text: str) -> None:
    """`ds-vlm: text` on rank 0's stderr, once per process."""
    if text in _said:
        return
    _said.add(text)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"ds-vlm: {text}", file=sys.stderr, flush=True)


def quiet_console(rank: int, verbose: bool = False) -> None:
    """Each distinct warning once, on rank 0 only (the other ranks' copies say nothing new); the known noise
    above never; DeepSpeed's and transformers' INFO lines only with --verbose (their warnings always)."""
    if verbose:
        warnings.simplefilter("default")
        return
    warnings.simplefilter("once" if rank == 0 else "ignore")
    for category, message, _why in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("PYTHONWARNINGS", "ignore" if rank else "once")  # DataLoader workers inherit it
    for name in ("DeepSpeed", "torch.distributed", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning() if rank == 0 else hf_logging.set_verbosity_error()
        if not sys.stderr.isatty():  # "Writing model shards: 100%" redrawn into a log file
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
