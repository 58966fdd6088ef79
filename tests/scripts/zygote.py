"""A process that has imported what every rank imports (torch, transformers' vision-language classes,
torchvision, DeepSpeed, ds_vlm) and forks ranks from itself: the test suite's ranks start without the ~4-5 s
of imports each (two ranks on two cores), everything after the imports runs as in a fresh process.

    python -u tests/scripts/zygote.py SOCKET       # serve: tests/fixtures/runs.py starts one per test session
    tests/scripts/ranks.py uses spawn() when DS_VLM_TEST_ZYGOTE names the socket

One connection per rank. The client sends one JSON line {script, args, env, cwd, rlimits} with its stdin,
stdout and stderr file descriptors (SCM_RIGHTS); the server forks, answers {"pid": N}, and {"exit": code} (Popen's
convention: -N for signal N) once the rank is reaped. A client that goes away first (killed, timed out) has
its rank killed. The server stays single-threaded (a fork copies only the calling thread) and never runs a
torch operation (no thread pool exists to be lost in the fork). Interpreter-start settings cannot change
after the fork: a request whose PYTHONPATH, OMP_NUM_THREADS or PYTHONWARNINGS differ from the server's is
refused (`compatible`), and the client starts that rank as a plain process.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import sys
import time

STARTUP_ENV = ("PYTHONPATH", "OMP_NUM_THREADS", "PYTHONWARNINGS")
RLIMITS = ("RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CORE")  # passed on to the rank


def compatible(env: dict) -> bool:
    return all(env.get(key) == os.environ.get(key) for key in STARTUP_ENV)


def _preload() -> None:
    import deepspeed  # noqa: F401
    import torchvision  # noqa: F401
    import transformers
    from transformers import AutoProcessor, AutoTokenizer  # noqa: F401

    import ds_vlm.cli  # noqa: F401
    import ds_vlm.data.batching  # noqa: F401
    import ds_vlm.data.preflight  # noqa: F401
    import ds_vlm.runtime.distributed  # noqa: F401
    import ds_vlm.train.trainer  # noqa: F401

    for name in ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                 "Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                 "LlavaForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"):
        getattr(transformers, name, None)
    import transformers.masking_utils  # noqa: F401
    import transformers.models.qwen2_vl.image_processing_qwen2_vl  # noqa: F401


def _run_rank(request: dict, fds: list[int]) -> None:
    """In the forked child: become the rank (stdio, environment, cwd, argv) and run its script as __main__."""
    import resource
    import runpy
    import traceback

    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    for name, limits in request["rlimits"].items():  # the client's, as a child of it would inherit them
        if resource.getrlimit(getattr(resource, name)) != tuple(limits):
            resource.setrlimit(getattr(resource, name), tuple(limits))
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(path: str) -> None:
    _preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # the socket appears only once the imports are done
    parent = os.getppid()
    ranks: dict[socket.socket, int] = {}  # a rank's connection -> its pid
    pending: dict[socket.socket, tuple[bytes, list[int]]] = {}  # a connection whose request is still arriving
    while os.getppid() == parent:  # the test session ended (or died): stop
        readable, _, _ = select.select([server, *pending, *ranks], [], [], 0.05)
        for conn in readable:
            if conn is server:
                pending[server.accept()[0]] = (b"", [])
            elif conn in ranks:  # a rank's client sends nothing after its request: readable means it went away
                if not conn.recv(1):
                    _kill(ranks.pop(conn))
                    conn.close()
            else:
                _receive(conn, pending, ranks, server)
        _reap(ranks)
    for pid in ranks.values():
        _kill(pid)


def _receive(conn, pending: dict, ranks: dict, server) -> None:
    fds = array.array("i")
    data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    text, received = pending[conn]
    text, received = text + data, received + list(fds)
    if not data or not text.endswith(b"\n"):
        pending[conn] = (text, received)
        if not data:
            pending.pop(conn)
            conn.close()
        return
    del pending[conn]
    request = json.loads(text)
    if not compatible(request["env"]):
        for fd in received:
            os.close(fd)
        conn.sendall(json.dumps({"refused": f"{STARTUP_ENV} differ from the zygote's"}).encode() + b"\n")
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        server.close()
        for other in [*ranks, *pending, conn]:
            other.close()
        _run_rank(request, received)
    for fd in received:
        os.close(fd)
    ranks[conn] = pid
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _reap(ranks: dict) -> None:
    by_pid = {pid: conn for conn, pid in ranks.items()}
    while by_pid:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = by_pid.pop(pid, None)
        if conn is None:
            continue
        del ranks[conn]
        try:
            conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        except OSError:
            pass
        conn.close()


class Rank:
    """A rank forked by the zygote, with the part of subprocess.Popen that ranks.py uses."""

    def __init__(self, path: str, script: str, args: list[str], env: dict, cwd: str):
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(path)
        import resource

        rlimits = {name: resource.getrlimit(getattr(resource, name)) for name in RLIMITS}
        request = json.dumps({"script": script, "args": args, "env": env, "cwd": cwd, "rlimits": rlimits})
        request = request.encode() + b"\n"
        self._conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        self._file = self._conn.makefile("rb")
        answer = json.loads(self._file.readline() or b"{}")
        self.pid, self.returncode = answer.get("pid"), None

    def poll(self):
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._read_exit()
        return self.returncode

    def wait(self, timeout: float | None = None):
        import subprocess

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _read_exit(self) -> None:
        line = self._file.readline()
        self.returncode = json.loads(line)["exit"] if line else -signal.SIGKILL
        self._conn.close()


def spawn(script: str, args: list[str], env: dict, cwd: str):
    """A zygote-forked rank where the test session has a zygote that can start it, else None."""
    path = env.get("DS_VLM_TEST_ZYGOTE")
    if not path or not os.path.exists(path):
        return None
    rank = Rank(path, script, args, env, cwd)
    return rank if rank.pid is not None else None


if __name__ == "__main__":
    serve(sys.argv[1])
