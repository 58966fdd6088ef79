"""The suite's rank starter (tests/scripts/ranks.py) with its zygote: a forked rank is what a new process would
be (environment, folder, argv, resource limits, output, exit status, signals), and a rank whose starter goes
away does not outlive it."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import psutil
from fixtures.runs import _ZYGOTE, ROOT, free_port, start_zygote, train_env

SCRIPT = """
import json, os, resource, signal, sys, time
# one write per line: the zygote's ranks share its unbuffered stdout, where print() writes the text and the newline
# apart, so two ranks' lines could interleave as two objects on one line, then two newlines
sys.stdout.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "rank": os.environ["RANK"],
                             "marker": os.environ.get("ZYGOTE_TEST"), "path0": sys.path[0], "pid": os.getpid(),
                             "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0]}) + "\\n")
sys.stdout.flush()
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[-1] == "sleep":
    time.sleep(60)
# rank 0's failure stops the other ranks (as the DeepSpeed launcher does): it fails only once every rank has
# spoken, or a rank slow to start would be stopped before its lines and the test would see them missing
open(f"spoke.{os.environ['RANK']}", "w").close()
while not all(os.path.exists(f"spoke.{r}") for r in range(int(os.environ["WORLD_SIZE"]))):
    time.sleep(0.01)
sys.exit(3 if os.environ["RANK"] == "0" else 0)
"""


def _start(tmp_path, *args, **popen):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "scripts" / "ranks.py"), "2", str(free_port()),
                             str(script), *args], cwd=tmp_path, env=train_env({"ZYGOTE_TEST": "yes"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _zygote_ready() -> None:
    start_zygote()
    deadline = time.monotonic() + 120
    while not _ZYGOTE["path"].exists():
        assert time.monotonic() < deadline and _ZYGOTE["proc"].poll() is None, "the zygote did not come up"
        time.sleep(0.1)


def test_a_forked_rank_is_what_a_new_process_would_be(tmp_path):
    import json

    _zygote_ready()
    limit = 1 << 30
    proc = _start(tmp_path, "--flag", "x", preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                                 (limit, limit)))
    out, err = proc.communicate(timeout=60)
    seen = sorted((json.loads(line) for line in out.splitlines()), key=lambda r: r["rank"])
    assert proc.returncode == 3, err  # rank 0's status
    assert [r["rank"] for r in seen] == ["0", "1"]
    for rank, r in enumerate(seen):
        assert r["argv"] == [f"--local_rank={rank}", "--flag", "x"]
        assert r["cwd"] == str(tmp_path) and r["marker"] == "yes" and r["fsize"] == limit
        assert r["path0"] == str(tmp_path)
    assert err.count("to stderr") == 2


def test_signals_reach_forked_ranks_and_a_killed_starter_takes_them_along(tmp_path):
    import json

    _zygote_ready()
    proc = _start(tmp_path, "sleep")
    pids = [json.loads(proc.stdout.readline())["pid"] for _ in range(2)]
    zygote = psutil.Process(_ZYGOTE["proc"].pid)
    assert set(pids) <= {c.pid for c in zygote.children()}  # forked by the zygote, not started anew
    proc.send_signal(signal.SIGTERM)  # passed on; the ranks die of it, the starter exits with their -15
    assert proc.wait(timeout=30) == 256 - signal.SIGTERM
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    proc = _start(tmp_path, "sleep")
    pids = [json.loads(proc.stdout.readline())["pid"] for _ in range(2)]
    os.kill(proc.pid, signal.SIGKILL)  # nothing is passed on: the zygote sees its client gone
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in pids)
