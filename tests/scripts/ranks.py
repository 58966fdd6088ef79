"""Start N local ranks of a script the way `deepspeed --num_gpus N` does on one node, minus its start-up.

    python tests/scripts/ranks.py N PORT SCRIPT [ARGS ...]

Each rank gets the launcher's environment (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, ...)
and `--local_rank=i`. SIGTERM/SIGINT/SIGUSR1 are passed on to the ranks. When a rank fails, the others are
stopped (SIGTERM, then SIGKILL after 10 s) and its exit status is ours. The DeepSpeed launcher imports torch and
DeepSpeed before starting anything (~5 s a run on 2 cores); most tests launch many runs and test the trainer,
not the launcher (which tests/dist/test_launch.py, test_launch_failures.py, test_faults.py and the preemption
test use as users do).
Where the test session runs a zygote (tests/scripts/zygote.py; DS_VLM_TEST_ZYGOTE), the ranks are forked from it
with their imports done; otherwise, or with DS_VLM_TEST_ZYGOTE empty, they are new processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import zygote


def main() -> int:
    n, port, script, args = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    # Signals are taken from before the first rank starts (one that came while ranks were starting would
    # otherwise end this process by its default action and leave the ranks behind), only noted by the
    # handler, and passed on by the loop below to every rank, each signal once.
    received, passed = [], 0
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, lambda signum, frame: received.append(signum))
    ranks = []
    for rank in range(n):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(n), RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), CROSS_RANK="0", CROSS_SIZE="1")
        argv = [f"--local_rank={rank}", *args]
        ranks.append(zygote.spawn(script, argv, env, os.getcwd())
                     or subprocess.Popen([sys.executable, "-u", script, *argv], env=env))
    while True:
        while passed < len(received):
            for proc in ranks:
                if proc.poll() is None:
                    proc.send_signal(received[passed])
            passed += 1
        codes = [proc.poll() for proc in ranks]
        failed = [code for code in codes if code not in (None, 0)]
        if failed or all(code == 0 for code in codes):
            break
        time.sleep(0.05)
    if failed:
        for proc in ranks:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in ranks:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return failed[0]
    return 0


if __name__ == "__main__":
    sys.exit(main())
