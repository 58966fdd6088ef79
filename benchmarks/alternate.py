"""Cases compared with each other run together, taking turns: a shared machine's drifting load falls on
both alike (benchmarks/main.py's --pairing alternate)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from benchmarks.runner import ROOT, PeakMemory

# Cases compared with each other run as one pair, alternating: each ZeRO stage's two engines (ds-vlm, the
# Trainer), and token-budget batches padded against packed.
PAIRS = (("ds_zero2", "hf_zero2"), ("ds_zero3", "hf_zero3"), ("ds_zero0", "hf_zero0"),
         ("batch_budget", "batch_packed"))


def run_groups(cases: list[str], alternate: bool) -> list[tuple[str, ...]]:
    """The cases in run order, each ZeRO stage's (ds-vlm, Trainer) pair as one group where both run and
    `alternate`; every other case alone."""
    groups, done = [], set()
    for case in cases:
        if case in done:
            continue
        pair = next((p for p in PAIRS if case in p and all(c in cases for c in p)), None) if alternate else None
        group = pair or (case,)
        groups.append(group)
        done.update(group)
    return groups


def _logged_steps(case: str, out: Path) -> int:
    path = out / ("steps_rank0.jsonl" if case.startswith("hf_zero") else "metrics.jsonl")
    try:
        return sum('"step"' in line and '"event"' not in line for line in path.open())
    except OSError:
        return 0


def run_alternating(runs: list[tuple[str, list[str], Path]], timeout: int, window_s: float) -> dict[str, dict]:
    """Several cases at once, taking turns: each starts up (all at the same time), is paused (SIGSTOP to its
    whole session) once it has logged a step, and then they run one at a time in windows of `window_s`
    seconds, round robin, until every one has ended. A shared machine's load drifts over seconds to minutes
    (rounds of the same case run one after the other differed by up to 60% here); taking turns every few
    seconds puts the same drift on every case. A step that spans a pause is `interrupted_s` long or more
    (another case's whole window) and is left out of the medians (summarize's `interrupted_s`)."""
    procs, memories, logs, started = {}, {}, {}, time.perf_counter()
    for case, command, out in runs:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        logs[case] = open(out / "log.txt", "w")
        logs[case].write(shlex.join(command) + "\n")
        logs[case].flush()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
                   TOKENIZERS_PARALLELISM="false")
        procs[case] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=logs[case], stderr=subprocess.STDOUT,
                                       start_new_session=True)
        memories[case] = PeakMemory(procs[case], ranked=case != "plain")
    outs = {case: out for case, _, out in runs}
    deadline = time.monotonic() + timeout
    windows: dict[str, int] = {case: 0 for case in procs}

    def signal_group(case, signum):
        try:
            os.killpg(procs[case].pid, signum)
        except ProcessLookupError:
            pass

    paused: set[str] = set()
    while len(paused) < len(procs) and time.monotonic() < deadline:  # start-up, all at once
        for case, proc in procs.items():
            if case not in paused and (proc.poll() is not None or _logged_steps(case, outs[case]) >= 1):
                signal_group(case, signal.SIGSTOP)
                paused.add(case)
        time.sleep(0.05)
    live = [case for case in procs if procs[case].poll() is None]
    while live and time.monotonic() < deadline:
        for case in list(live):
            signal_group(case, signal.SIGCONT)
            windows[case] += 1
            end = time.monotonic() + window_s
            while time.monotonic() < min(end, deadline) and procs[case].poll() is None:
                time.sleep(0.02)
            if procs[case].poll() is None:
                signal_group(case, signal.SIGSTOP)
            else:
                live.remove(case)
    results = {}
    for case, proc in procs.items():
        if proc.poll() is None:  # past the deadline
            signal_group(case, signal.SIGCONT)
            signal_group(case, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                signal_group(case, signal.SIGKILL)
                proc.wait()
            rc = None
        else:
            rc = proc.returncode
        peaks = memories[case].stop()
        logs[case].close()
        tail = (outs[case] / "log.txt").read_text(errors="replace").strip().splitlines()[-12:]
        status = "ok" if rc == 0 else ("timeout" if rc is None else f"failed (exit {rc})")
        results[case] = {"status": status, "wall_s": round(time.perf_counter() - started, 1), "peak_rss_gb": peaks,
                         "log": str(outs[case] / "log.txt"), "windows": windows[case],
                         "interrupted_s": 0.5 * window_s, **({"log_tail": tail} if rc != 0 else {})}
    return results
