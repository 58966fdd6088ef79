"""Command-line front of the trainer: errors a user can fix print one clear line, not a traceback."""

from __future__ import annotations

import sys

from .config import ConfigError, load_config
from .data.formats import DataError


def main(argv=None) -> int:
    from .data.preflight import BadDataError
    from .distributed import RendezvousError
    from .train import TrainingDiverged, run

    try:
        config = load_config(argv)
        run(config)
    except (ConfigError, DataError, BadDataError, TrainingDiverged, RendezvousError, FileNotFoundError) as err:
        print(f"ds-vlm: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
