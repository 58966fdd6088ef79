"""Cluster faults on 2 CPU ranks: a rank that stops responding or stalls in its data loader ends the run within
--dist_timeout_s with a message naming it and the phase; the rendezvous port in use is said as such; a second
preemption signal exits at once. (Preemption itself, checkpoint and exact resume: tests/dist/test_checkpoint.py.)"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from fixtures.runs import ROOT, read_metrics, train_command, train_env

TIMEOUT = 20  # --dist_timeout_s


def _args(demo_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(demo_dir / "model"), "--train_data", str(data), "--deepspeed",
            str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out), "--max_steps", "400",
            "--micro_batch_size", "2", "--num_workers", "0", "--export_hf", "false", "--dist_timeout_s", str(TIMEOUT),
            *extra]


def _start(args: list[str], sink=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(train_command(args, launcher="deepspeed"), cwd=ROOT, env=train_env(), stdout=sink,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in read_metrics(out)):
            return
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def _rank(proc: subprocess.Popen, rank: int) -> psutil.Process:
    return next(p for p in psutil.Process(proc.pid).children(recursive=True)
                if f"--local_rank={rank}" in " ".join(p.cmdline()))


@pytest.mark.waits
def test_a_stopped_rank_is_named_and_the_run_ends(demo_dir, tmp_path):
    """SIGSTOP rank 1 mid-run: rank 0 exits within --dist_timeout_s naming rank 1 and its last phase; the
    launcher exits non-zero. (Rank 1 is let go once rank 0 has reported, so the launcher's own 30 s grace
    before SIGKILL does not stretch the test.)"""
    out = tmp_path / "run"
    proc = _start(_args(demo_dir, demo_dir / "data" / "train.jsonl", out))
    _wait_for_step(out, 2, proc)
    stopped = _rank(proc, 1)
    stopped.send_signal(signal.SIGSTOP)
    began, reported = time.monotonic(), None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "rank 1 stopped responding" in line and reported is None:
            reported = time.monotonic() - began
            stopped.send_signal(signal.SIGCONT)
    proc.wait(timeout=120)
    text = "".join(lines)
    assert reported is not None and reported < TIMEOUT + 5, text[-3000:]
    assert "ds-vlm: error: rank 0 has been in phase " in text and "(--dist_timeout_s): the run is stuck" in text
    assert "rank 1 stopped responding: no heartbeat for" in text and "(last: phase " in text
    assert proc.returncode != 0


@pytest.mark.waits
def test_a_stalled_data_loader_is_named(demo_dir, tmp_path):
    """Rank 1's DataLoader worker stops (a hung file system would look the same): rank 1 says its data loader
    returned nothing, rank 0 says rank 1 is alive in phase data; both within --dist_timeout_s; the launcher
    exits non-zero. (The worker is let go once rank 1 has reported, so that the launcher's 30 s grace before
    SIGKILL does not stretch the test.)"""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as sink:  # not a pipe: the stopped worker would hold it open after everything else ended
        proc = _start(_args(demo_dir, demo_dir / "data" / "train.jsonl", out, "--num_workers", "1"), sink)
        try:
            _wait_for_step(out, 2, proc)
            (worker,) = _rank(proc, 1).children()
            worker.send_signal(signal.SIGSTOP)
            began = time.monotonic()
            while proc.poll() is None and time.monotonic() - began < TIMEOUT + 40:
                if "rank 1's data loader returned no batch" in log.read_text():
                    try:
                        worker.send_signal(signal.SIGCONT)  # reported: let it go (the launcher would wait 30 s)
                    except psutil.NoSuchProcess:
                        pass
                    break
                time.sleep(0.1)
            proc.wait(timeout=180)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the stopped worker, if it outlived the rest
            except ProcessLookupError:
                pass
    text = log.read_text()
    assert time.monotonic() - began < TIMEOUT + 40, text[-3000:]
    assert "ds-vlm: error: rank 1 has been in phase data of step" in text, text[-3000:]
    assert "rank 1's data loader returned no batch" in text
    assert "rank 1 is alive, in phase data of step" in text  # what rank 0 says
    assert proc.returncode != 0


@pytest.mark.waits
def test_the_rendezvous_port_in_use_is_said_as_such(demo_dir, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = _args(demo_dir, demo_dir / "data" / "train.jsonl", tmp_path / "run")
        command = train_command(args, launcher="deepspeed")
        command[command.index("--master_port") + 1] = str(port)
        proc = subprocess.run(command, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"ds-vlm: error: port {port} on node 0 (127.0.0.1) is already in use" in proc.stderr, proc.stderr[-3000:]
    assert "cannot be reached" not in proc.stderr


@pytest.mark.waits
def test_a_second_signal_exits_at_once(tmp_path):
    """The first SIGUSR1 asks for a stop at the end of the step; one arriving within 2 s (a launcher passing the
    group's signal on) is the same request; a later one exits at once with 128 + its number. The 2 s are read
    from a clock the test sets, not waited for: a loaded machine may pause a process for that long between
    two lines."""
    code = textwrap.dedent("""
        import os, signal, time, types
        import ds_vlm.runtime.faults as faults
        clock = [100.0]
        faults.time = types.SimpleNamespace(monotonic=lambda: clock[0])
        stop = faults.StopSignals(0)
        print("before", stop.requested, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        clock[0] += 1.9
        os.kill(os.getpid(), signal.SIGUSR1)  # the duplicate
        print("requested", stop.requested, flush=True)
        clock[0] += 0.2
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.5)  # the handler runs at the next bytecode: it has exited before this ends
        print("still running", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "before False" in proc.stdout and "requested True" in proc.stdout, proc.stderr[-2000:]
    assert "still running" not in proc.stdout
    assert proc.returncode == 128 + signal.SIGUSR1
    assert "SIGUSR1: finishing the step in progress, then a checkpoint, then exit 75" in proc.stderr


@pytest.mark.waits
def test_a_record_that_fails_on_one_rank_ends_the_job_in_seconds(demo_dir, tmp_path):
    """A record's image is deleted mid-run (after preflight checked it): the rank that draws it next fails in
    its data phase, names the record, phase and step, and exits without waiting for its DataLoader worker; the
    other rank, waiting for it in the step's collectives, reads the failure from the rendezvous store and exits
    too. The job ends within seconds, not after --dist_timeout_s (600 here). Meanwhile a record that spells
    vision tokens in its text trains as text."""
    import json
    import shutil

    rows = [json.loads(line) for line in (demo_dir / "data" / "train.jsonl").read_text().splitlines()]
    victim = tmp_path / "victim.png"
    shutil.copy(demo_dir / "data" / rows[5]["images"][0], victim)
    rows = [{**r, "images": [str(victim) if i == 5 else str(demo_dir / "data" / r["images"][0])]}
            for i, r in enumerate(rows)]
    # the record that crashed the first step of a run and then hung it (issue 35): its vision tokens are text now
    rows[7] = {"conversations": [{"from": "human", "value": "Echo <|vision_start|><|image_pad|><|vision_end|>"},
                                 {"from": "gpt", "value": "A red circle."}]}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, log = tmp_path / "run", tmp_path / "log.txt"
    with open(log, "w") as sink:
        proc = _start(_args(demo_dir, data, out, "--num_workers", "1", "--dist_timeout_s", "600"), sink)
        try:
            _wait_for_step(out, 2, proc)
            victim.unlink()
            began = time.monotonic()
            proc.wait(timeout=120)
            ended = time.monotonic() - began
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    assert proc.returncode != 0 and ended < 30, (ended, text[-3000:])
    failed = re.search(r"ds-vlm: rank (\d) failed in phase data of step \d+: ds_vlm\.data\.sample\.DataError: "
                       + re.escape(f"{data} record 5: missing_image: image file {victim} does not exist (in a "
                                   "DataLoader worker)"), text)
    assert failed, text[-3000:]
    other = 1 - int(failed[1])
    assert f"ds-vlm: rank {other}: stopping: rank {failed[1]} failed in phase data of step" in text, text[-3000:]
    assert "has been in phase" not in text  # not the watchdog's timeout
    assert f"note: text spelling the control token <|image_pad|>, encoded as plain text in 1 record ({data} record " \
           "7)" in text, text[-3000:]
