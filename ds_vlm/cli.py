"""Command-line front of the trainer: errors a user can fix print one clear line, not a traceback.

Exit statuses: 0 done; 2 an error the message explains (config, data, too many bad records, rendezvous, divergence);
75 preempted (SIGTERM/SIGUSR1: a checkpoint was written; run the same command to resume); 3 the run hung
(a rank stopped responding: the watchdog names it); 1 anything else (a traceback).
"""

from __future__ import annotations

import sys

from .config import ConfigError, load_config
from .data.formats import DataError


def main(argv=None) -> int:
    from .data.preflight import BadDataError, TooManyBadRecords
    from .distributed import RendezvousError
    from .faults import PREEMPTED_EXIT, Preempted
    from .train import TrainingDiverged, run

    try:
        config = load_config(argv)
        run(config)
    except Preempted as err:
        print(f"ds-vlm: {err} (exit {PREEMPTED_EXIT})", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except (ConfigError, DataError, BadDataError, TrainingDiverged, TooManyBadRecords, RendezvousError,
            FileNotFoundError) as err:
        print(f"ds-vlm: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
