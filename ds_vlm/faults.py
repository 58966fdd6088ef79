"""Cluster faults: a preemption signal, and a rank that stops responding.

Preemption (SIGTERM, or SIGUSR1: what SLURM and Kubernetes send before killing a job): every rank finishes
the optimizer step in progress (or the next one: the ranks agree on where to stop without a barrier), a
checkpoint is written, a `preempted` event logged, and every rank exits with PREEMPTED_EXIT (75,
EX_TEMPFAIL: "try again", so a job script can requeue). A second signal, 2 s or more after the first
(a launcher passing the first on to its ranks arrives within milliseconds), exits at once with 128 + its number.

A hang: every rank's `Watchdog` thread publishes what its main thread is doing (phase: data, forward,
backward, step, checkpoint, eval; step; for how long) to the rendezvous store every second. A rank that
has been in one phase for --dist_timeout_s (a collective that never completes, a data loader that never
returns) reads the others' heartbeats, prints which rank holds it up and in which phase, and exits with
HUNG_EXIT (3); the launcher then stops the rest and exits non-zero.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

PREEMPTED_EXIT = 75
HUNG_EXIT = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """The run stopped for a preemption signal, after a checkpoint."""


class StopSignals:
    """The first SIGTERM/SIGUSR1 asks for a stop (`requested`); the ranks agree on the step after which to
    stop through the step's own all-reduce (the label count carries every rank's request: see
    StepRunner.start), so the stop costs no collective and no barrier of its own."""

    def __init__(self, rank: int):
        self.rank, self.requested, self._first_at = rank, False, None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self._first_at is None:
            self._first_at, self.requested = now, True
            if self.rank == 0:
                print(f"ds-vlm: {signal.Signals(signum).name}: finishing the step in progress, then a checkpoint, "
                      f"then exit {PREEMPTED_EXIT} (a second signal exits at once)", file=sys.stderr, flush=True)
        elif now - self._first_at >= 2.0:
            os._exit(128 + signum)


INTERRUPTED_EXIT = 128 + signal.SIGINT  # 130: what a shell reports for Ctrl-C


def exit_on_interrupt() -> None:
    """Ctrl-C (SIGINT: a terminal sends it to the launcher's whole process group, and the recipe scripts pass
    it on) ends this rank at once: no checkpoint, no unwinding, no interpreter teardown.

    Python's default, KeyboardInterrupt, is raised only when the main thread is back in the interpreter, and
    then unwinds and tears down gloo, DeepSpeed and the DataLoader workers. A rank blocked in a collective
    waits until its peer has done all that (8-14 s per rank on a loaded 2-core machine), and meanwhile
    DeepSpeed's launch.py turns the Ctrl-C into SIGTERM, which a rank still alive takes for preemption (a
    checkpoint), and kills what is left 30 s later: two nodes took over 45 s to stop. Exiting at the first
    bytecode ends a rank as soon as its main thread runs Python; a peer blocked on it sees its collective fail
    and exits the same way. Forked DataLoader workers inherit the handler and exit silently."""
    owner = os.getpid()
    message = (b"ds-vlm: interrupted (SIGINT): stopped at once, without a checkpoint (SIGTERM or SIGUSR1 stops "
               b"after one)\n")

    def interrupted(signum, frame):
        if os.getpid() == owner and os.environ.get("LOCAL_RANK", "0") == "0":  # once per node
            os.write(2, message)  # not print: the main thread may be inside a print to stderr
        os._exit(INTERRUPTED_EXIT)

    signal.signal(signal.SIGINT, interrupted)


def ignore_stop_signals(_worker_id=None) -> None:
    """For DataLoader workers: a signal to the process group is the main process's to handle."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class Watchdog:
    """Publishes this rank's phase every second; if the phase lasts `timeout_s` (0.9 x --dist_timeout_s, so
    the message comes before gloo's or NCCL's own timeout), names the rank that holds the others up."""

    def __init__(self, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s, self.step = rank, world, timeout_s, 0
        self._phase: tuple[str, int, float] | None = None  # (name, step, since), set by the main thread
        self._store = None
        threading.Thread(target=self._run, name="ds-vlm-watchdog", daemon=True).start()

    def phase(self, name: str | None, step: int | None = None) -> None:
        """What the main thread does now (None: nothing watched); `step` stays the last one given."""
        self.step = self.step if step is None else step
        self._phase = None if name is None else (name, self.step, time.monotonic())

    # -- the thread -------------------------------------------------------------------------
    def _connect(self):
        """A store client of its own (to the rendezvous store rank 0 hosts), with a short timeout: if rank 0
        is the one that stopped, asking it must not hang this thread too."""
        if self._store is None:
            self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world,
                                        is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False)
        return self._store

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            phase = self._phase
            try:
                self._connect().set(f"ds_vlm/heartbeat/{self.rank}", json.dumps(
                    {"time": time.time(), "phase": phase[0] if phase else None, "step": phase[1] if phase else None,
                     "for_s": time.monotonic() - phase[2] if phase else 0.0}))
            except Exception:  # noqa: BLE001 - the store is unreachable: rank 0 stopped, seen below
                pass
            if phase is not None and time.monotonic() - phase[2] > self.timeout_s:
                self._report(phase)

    def _report(self, phase: tuple[str, int, float]) -> None:
        name, step, since = phase
        lines = [f"ds-vlm: error: rank {self.rank} has been in phase {name} of step {step} for "
                 f"{time.monotonic() - since:.0f} s (--dist_timeout_s): the run is stuck"]
        if name == "data":
            lines.append(f"  rank {self.rank}'s data loader returned no batch: its data source stalls (a hung file "
                         "system or a slow remote mount?)")
        lines += self._others()
        print("\n".join(lines) + f"\n  where rank {self.rank}'s threads are:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(HUNG_EXIT)

    def _others(self) -> list[str]:
        lines, now = [], time.time()
        for rank in range(self.world):
            if rank == self.rank:
                continue
            try:
                beat = json.loads(self._connect().get(f"ds_vlm/heartbeat/{rank}"))
            except Exception:  # noqa: BLE001
                lines.append(f"  rank {rank}: no answer from the rendezvous store"
                             + (" (rank 0 hosts it: rank 0 stopped responding)" if rank == 0 else ""))
                continue
            age = now - beat["time"]
            if age > 5:
                lines.append(f"  rank {rank} stopped responding: no heartbeat for {age:.0f} s (last: phase "
                             f"{beat['phase']} of step {beat['step']}); stopped, frozen or its node is gone")
            else:
                lines.append(f"  rank {rank} is alive, in phase {beat['phase']} of step {beat['step']} for "
                             f"{beat['for_s']:.0f} s")
        return lines
