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

An exception on one rank (a record that fails to read in training, an error in the forward): that rank says what
failed, in which phase of which step and on which records (`Watchdog.failed`), writes it to the rendezvous store,
and exits without waiting for its DataLoader workers (the caller ends with os._exit). The other ranks' watchdog
threads read it within a second and exit with PEER_FAILED_EXIT (1), instead of waiting in a collective for
--dist_timeout_s. The failing rank waits (at most FAILED_GRACE_S) until every other rank has read it: rank 0 hosts
the store.
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
PEER_FAILED_EXIT = 1
FAILED_KEY = "ds_vlm/failed"
FAILED_GRACE_S = 5.0
STEP_PHASES = ("forward", "backward", "step")  # the phases that compute on the step's records
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


LONG_PHASES = frozenset({"checkpoint", "eval", "export", "convert"})


def describe(error: BaseException) -> str:
    """`error` in one line: its type and message; an error a DataLoader worker raised (which the loader
    re-raises as a RuntimeError holding the worker's traceback) as the worker's own last line."""
    text = str(error)
    if "Original Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"{lines[-1][:1000]} (in a DataLoader worker)"
    return f"{type(error).__name__}: {' '.join(text.split())[:1000]}"


class Watchdog:
    """Publishes this rank's phase every second; if the phase lasts `timeout_s` (0.9 x --dist_timeout_s, so
    the message comes before gloo's or NCCL's own timeout), or `long_timeout_s` for a phase of LONG_PHASES,
    names the rank that holds the others up."""

    def __init__(self, rank: int, world: int, timeout_s: float, long_timeout_s: float = 7200.0, start: bool = True):
        self.rank, self.world, self.timeout_s, self.step = rank, world, timeout_s, 0
        self.long_timeout_s = max(long_timeout_s, timeout_s)
        self._phase: tuple[str, int, float] | None = None  # (name, step, since), set by the main thread
        self._store = None
        self._failing = False  # this rank raised: the failure it read in the store is its own
        if start:  # the heartbeat thread (the limits alone: start=False)
            threading.Thread(target=self._run, name="ds-vlm-watchdog", daemon=True).start()

    def limit_s(self, name: str) -> float:
        """How long the phase `name` may last."""
        return self.long_timeout_s if name in LONG_PHASES else self.timeout_s

    def overdue(self, phase: tuple[str, int, float] | None, now: float) -> bool:
        """Whether `phase` (name, step, since) has lasted longer than its limit at `now`."""
        return phase is not None and now - phase[2] > self.limit_s(phase[0])

    def phase(self, name: str | None, step: int | None = None) -> None:
        """What the main thread does now (None: nothing watched); `step` stays the last one given."""
        self.step = self.step if step is None else step
        self._phase = None if name is None else (name, self.step, time.monotonic())

    def failed(self, error: BaseException, records: tuple[str, ...] = ()) -> None:
        """This rank raised `error`: say where (phase, step, `records`: those of the step in flight) on stderr and
        in the rendezvous store, where the other ranks' watchdogs read it and stop; return once they have read
        it (at most FAILED_GRACE_S)."""
        phase = self._phase
        where = (f"in phase {phase[0]} of step {phase[1]}" if phase else
                 f"after step {self.step}" if self.step else "before training")
        message = f"rank {self.rank} failed {where}: {describe(error)}"
        if records and phase and phase[0] in STEP_PHASES:  # (a data error names its record itself)
            message += f" (records of the step on rank {self.rank}: {', '.join(records)})"
        print(f"ds-vlm: {message}", file=sys.stderr, flush=True)
        self._failing = True
        if self.world < 2:
            return
        try:
            store = self._client()  # the main thread's own: the watchdog thread may be using its client
            first = json.loads(store.compare_set(FAILED_KEY, "", json.dumps({"rank": self.rank, "message": message})))
            if first["rank"] != self.rank:  # another rank failed first (an error every rank meets): it is told
                store.set(f"{FAILED_KEY}/seen/{self.rank}", "1")
                return
            deadline = time.monotonic() + FAILED_GRACE_S
            others = [f"{FAILED_KEY}/seen/{rank}" for rank in range(self.world) if rank != self.rank]
            while time.monotonic() < deadline and not store.check(others):
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the store is gone (rank 0 stopped): the others see that themselves
            pass

    def _stop_if_another_failed(self) -> None:
        """Another rank wrote a failure to the store: say so and exit (this rank would wait for it in a
        collective until --dist_timeout_s)."""
        store = self._connect()
        if self._failing or not store.check([FAILED_KEY]):
            return
        failure = json.loads(store.get(FAILED_KEY))
        if failure["rank"] == self.rank:
            return
        store.set(f"{FAILED_KEY}/seen/{self.rank}", "1")
        print(f"ds-vlm: rank {self.rank}: stopping: {failure['message']}", file=sys.stderr, flush=True)
        os._exit(PEER_FAILED_EXIT)

    # -- the thread -------------------------------------------------------------------------
    def _connect(self):
        """The thread's store client (`_client`), made once."""
        if self._store is None:
            self._store = self._client()
        return self._store

    def _client(self):
        """A store client of its own (to the rendezvous store rank 0 hosts), with a short timeout: if rank 0
        is the one that stopped, asking it must not hang this thread too."""
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world, is_master=False,
                             timeout=timedelta(seconds=5), wait_for_workers=False)

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            phase = self._phase
            try:
                self._connect().set(f"ds_vlm/heartbeat/{self.rank}", json.dumps(
                    {"time": time.time(), "phase": phase[0] if phase else None, "step": phase[1] if phase else None,
                     "for_s": time.monotonic() - phase[2] if phase else 0.0}))
                self._stop_if_another_failed()
            except Exception:  # noqa: BLE001 - the store is unreachable: rank 0 stopped, seen below
                pass
            if self.overdue(phase, time.monotonic()):
                self._report(phase)

    def _report(self, phase: tuple[str, int, float]) -> None:
        name, step, since = phase
        lines = [f"ds-vlm: error: rank {self.rank} has been in phase {name} of step {step} for "
                 f"{time.monotonic() - since:.0f} s "
                 f"({'--long_phase_timeout_s' if name in LONG_PHASES else '--dist_timeout_s'}): the run is stuck"]
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
