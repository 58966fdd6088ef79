"""Multi-node runs on one machine through the DeepSpeed launcher: two launchers as two nodes, a node that never joins,
a killed rank, Ctrl-C, and (opt-in) ssh + pdsh."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest
from fixtures.runs import ROOT, RUNNER, free_port, launch_env, read_metrics

RECIPE = ROOT / "launch" / "run_qwen3_vl_2b.sh"


MULTINODE = ROOT / "launch" / "run_multinode.sh"


TINY = ["--max_steps", "4", "--micro_batch_size", "2", "--lr", "2e-3", "--warmup_ratio", "0", "--num_workers", "0",
        "--max_length", "512", "--export_hf", "false", "--dist_timeout_s", "60"]


def _session(sid: int) -> list[psutil.Process]:
    """Live processes of the session `sid` (a process started with start_new_session=True and all it started)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


def _left_running(sid: int, grace: float = 15) -> list[str]:
    """Processes of session `sid` still alive after up to `grace` seconds (ranks may take a moment to go)."""
    deadline = time.monotonic() + grace
    while True:
        left = []
        for proc in _session(sid):
            try:
                left.append(f"{proc.pid} " + " ".join(proc.cmdline()[:5]))
            except psutil.Error:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _kill_session(sid: int) -> None:
    for proc in _session(sid):
        try:
            proc.kill()
        except psutil.Error:
            pass


def _in_terminal(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start `cmd` as a shell would in a terminal: its own session on a new pseudo-terminal (its controlling
    tty), output copied to `log`. proc.terminal: the pty's master end (write b"\\x03" for Ctrl-C)."""
    master, slave = os.openpty()

    def own_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=own_terminal)
    os.close(slave)

    def copy():  # drain the pty, or writers block once its small buffer is full
        with open(log, "wb") as out:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has gone
                    break
                if not data:
                    break
                out.write(data)
                out.flush()

    proc.copier = threading.Thread(target=copy, daemon=True)
    proc.copier.start()
    proc.terminal = master
    return proc


@pytest.fixture
def spawn(tmp_path):
    """spawn(cmd, name, env, terminal=False) -> Popen in a new session (on its own pseudo-terminal if
    `terminal`), output in tmp_path/name.log; everything in those sessions is killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(cmd: list[str], name: str, env: dict, terminal: bool = False) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        if terminal:
            proc = _in_terminal(cmd, env, log)
        else:
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        proc.log = log
        started.append(proc)
        return proc

    yield start
    for proc in started:
        _kill_session(proc.pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if hasattr(proc, "terminal"):
            proc.copier.join(timeout=5)
            os.close(proc.terminal)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> dict[int, float]:
    """Wait for every process; pid -> seconds until it exited. Fails the test past `timeout`."""
    start, done = time.monotonic(), {}
    while len(done) < len(procs):
        for proc in procs:
            if proc.pid not in done and proc.poll() is not None:
                done[proc.pid] = time.monotonic() - start
        if time.monotonic() - start > timeout:
            logs = "\n\n".join(_tail(p) for p in procs if p.pid not in done)
            pytest.fail(f"still running after {timeout:.0f} s:\n{logs}")
        time.sleep(0.1)
    return done


def _tail(proc: subprocess.Popen, n: int = 6000) -> str:
    return f"--- {proc.log.name} (rc {proc.poll()}) ---\n" + proc.log.read_text(errors="replace")[-n:]


def _wait_for_steps(out: Path, steps: int, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Until rank 0 has logged `steps` optimizer steps (the run is training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= steps:
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("a launcher ended before training:\n" + "\n\n".join(_tail(p) for p in procs))
        time.sleep(0.2)
    pytest.fail(f"no {steps} steps within {timeout} s:\n" + "\n\n".join(_tail(p) for p in procs))


def _ranks(procs: list[subprocess.Popen]) -> dict[int, psutil.Process]:
    """Global rank -> the trainer process, among everything these launchers started."""
    ranks = {}
    for proc in procs:
        for child in _session(proc.pid):
            try:
                if any(a.endswith("launch/train.py") for a in child.cmdline()):
                    ranks[int(child.environ()["RANK"])] = child
            except (psutil.Error, KeyError):
                pass
    return ranks


def _hostfile(tmp_path: Path) -> Path:
    """Two 'nodes' of one slot each; the names do not resolve: with --no_ssh they are only counted."""
    path = tmp_path / "hostfile"
    path.write_text("node-a.invalid slots=1\nnode-b.invalid slots=1\n")
    return path


def _two_node_env(tmp_path: Path, node_rank: int, port: int, **extra) -> dict:
    return launch_env(NODE_RANK=node_rank, HOSTFILE=_hostfile(tmp_path), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                      **extra)


def _recipe_tiny(demo_dir: Path, out: Path) -> dict:
    return {"MODEL": demo_dir / "model", "DATA": demo_dir / "data", "OUT": out}


def test_two_launchers_as_two_nodes_match_one_launcher(demo_dir, tmp_path, spawn):
    """The recipe script on one launcher (NUM_GPUS=2), then as node 0 and node 1 (NODE_RANK=0/1: two launchers
    with --no_ssh meeting on 127.0.0.1): one world of 2 ranks, the same losses step by step. Then ZeRO++ with
    hpZ on two nodes of 2 ranks: the same losses again."""
    single_out, two_out = tmp_path / "single", tmp_path / "two"
    single = spawn(["bash", str(RECIPE), *TINY], "single",
                   launch_env(NUM_GPUS=2, MASTER_PORT=free_port(), **_recipe_tiny(demo_dir, single_out)))
    _wait_all([single], timeout=300)
    assert single.returncode == 0, _tail(single)

    port = free_port()
    nodes = [spawn(["bash", str(RECIPE), *TINY], f"node{r}",
                   _two_node_env(tmp_path, r, port, GPUS_PER_NODE=1, **_recipe_tiny(demo_dir, two_out)))
             for r in (0, 1)]
    _wait_all(nodes, timeout=300)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(_tail(n) for n in nodes)
    for r, node in enumerate(nodes):
        text = node.log.read_text()
        assert f"--node_rank={r}" in text and f"nnodes=2, num_local_procs=1, node_rank={r}" in text

    one, two = read_metrics(single_out), read_metrics(two_out)
    assert json.loads((two_out / "run_config.json").read_text())["world_size"] == 2
    assert json.loads((single_out / "run_config.json").read_text())["world_size"] == 2
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    print(f"\nlosses one launcher: {[round(r['loss'], 6) for r in one]}\n"
          f"losses two nodes:    {[round(r['loss'], 6) for r in two]}\nmax |diff| {max(diffs):.2e}")
    assert max(diffs) < 1e-4, (one, two)
    assert all(abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 for a, b in zip(one, two))
    assert one[-1]["loss"] < one[0]["loss"]

    # ZeRO++ (ds_configs/zero3pp.json) on two nodes of two ranks each, micro-batch 1 (the same global batches):
    # hpZ on, its secondary weight partition the 2 ranks of a node; quantized communication off (no CUDA)
    pp_out, port = tmp_path / "zero3pp", free_port()
    hostfile = tmp_path / "hostfile_2x2"
    hostfile.write_text("node-a.invalid slots=2\nnode-b.invalid slots=2\n")
    nodes = [spawn(["bash", str(RECIPE), "zero3pp", *TINY, "--micro_batch_size", "1"], f"zero3pp_node{r}",
                   launch_env(NODE_RANK=r, HOSTFILE=hostfile, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                              GPUS_PER_NODE=2, **_recipe_tiny(demo_dir, pp_out)))
             for r in (0, 1)]
    _wait_all(nodes, timeout=300)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(_tail(n) for n in nodes)
    run = json.loads((pp_out / "run_config.json").read_text())
    zero = run["ds_config"]["zero_optimization"]
    assert run["world_size"] == 4 and zero["stage"] == 3 and zero["zero_hpz_partition_size"] == 2, zero
    assert zero["zero_quantized_weights"] is zero["zero_quantized_gradients"] is False
    pp = read_metrics(pp_out)
    print(f"losses ZeRO++ 2x2:    {[round(r['loss'], 6) for r in pp]}")
    assert [r["step"] for r in pp] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, pp)) < 1e-4, (one, pp)


def _tiny_flags(demo_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(demo_dir / "model"), "--train_data", str(demo_dir / "data" / "train.jsonl"),
            "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--output_dir", str(out), *TINY, *extra]


@pytest.mark.waits
def test_node_that_never_joins_fails_with_a_clear_error(demo_dir, tmp_path, spawn):
    """Node 0 waits for a node 1 that never comes; (elsewhere) node 1 waits for a master that never comes.
    Both end after --dist_timeout_s with an error that says so, not an endless wait."""
    timeout_s = 8
    alone = {r: spawn(["bash", str(MULTINODE), *_tiny_flags(demo_dir, tmp_path / f"alone{r}",
                                                             "--dist_timeout_s", str(timeout_s))],
                      f"alone{r}", _two_node_env(tmp_path, r, free_port()))
             for r in (0, 1)}
    took = _wait_all(list(alone.values()), timeout=timeout_s + 150)
    print(f"\nnever-joining node: node 0 ended after {took[alone[0].pid]:.1f} s, node 1 after "
          f"{took[alone[1].pid]:.1f} s (--dist_timeout_s {timeout_s}, process start-up included)")
    node0, node1 = alone[0].log.read_text(), alone[1].log.read_text()
    assert alone[0].returncode != 0 and alone[1].returncode != 0
    assert re.search(r"ds-vlm: error: only 1 of 2 ranks joined the rendezvous at 127\.0\.0\.1:\d+ within 8 s: "
                     r"a node did not join", node0), node0[-3000:]
    assert re.search(r"ds-vlm: error: rank 1 could not reach the master \(node 0\) at 127\.0\.0\.1:\d+ "
                     r"\(--dist_timeout_s 8\): node 0 did not start", node1), node1[-3000:]
    for proc in alone.values():
        assert _left_running(proc.pid) == []


@pytest.mark.waits
def test_killed_rank_stops_the_other_node_promptly(demo_dir, tmp_path, spawn):
    """kill -9 the rank of node 1 mid-run: both launchers exit non-zero within seconds (gloo sees the peer
    gone), far sooner than --dist_timeout_s (60), and nothing is left running."""
    out, port, hostfile = tmp_path / "run", free_port(), _hostfile(tmp_path)
    nodes = [spawn([*RUNNER, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r), "--master_addr",
                    "127.0.0.1", "--master_port", str(port), "launch/train.py",
                    *_tiny_flags(demo_dir, out, "--max_steps", "5000")], f"node{r}", launch_env())
             for r in (0, 1)]
    _wait_for_steps(out, 2, nodes)
    ranks = _ranks(nodes)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1].pid, signal.SIGKILL)
    took = _wait_all(nodes, timeout=45)
    print(f"\nrank 1 killed: node 1's launcher exited after {took[nodes[1].pid]:.1f} s (rc {nodes[1].returncode}), "
          f"node 0's after {took[nodes[0].pid]:.1f} s (rc {nodes[0].returncode})")
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert max(took.values()) < 30, took
    for node in nodes:
        assert _left_running(node.pid) == []
    assert len(read_metrics(out)) < 5000


@pytest.mark.waits
def test_ctrl_c_leaves_no_process(demo_dir, tmp_path, spawn):
    """Two nodes started with the recipe script, stopped mid-run: node 0 by Ctrl-C typed into its terminal (the
    tty sends SIGINT to the script's process group, the script passes it to the launcher's group), node 1 by
    SIGINT to the script's pid alone, as a supervisor's `kill -INT PID` does. Both end within seconds and
    leave no process. (DeepSpeed's runner forwards nothing itself in --no_ssh or single-node mode: SIGINT to
    its pid only would leave launch.py and the ranks running.)"""
    out, port = tmp_path / "run", free_port()
    nodes = [spawn(["bash", str(RECIPE), *TINY, "--max_steps", "5000"], f"node{r}",
                   _two_node_env(tmp_path, r, port, GPUS_PER_NODE=1, **_recipe_tiny(demo_dir, out)),
                   terminal=r == 0)
             for r in (0, 1)]
    _wait_for_steps(out, 2, nodes)
    assert sorted(_ranks(nodes)) == [0, 1]
    os.write(nodes[0].terminal, b"\x03")
    os.kill(nodes[1].pid, signal.SIGINT)
    took = _wait_all(nodes, timeout=45)
    left = [_left_running(node.pid) for node in nodes]
    print(f"\nCtrl-C in node 0's terminal: exited after {took[nodes[0].pid]:.1f} s (rc {nodes[0].returncode}); "
          f"SIGINT to node 1's script: exited after {took[nodes[1].pid]:.1f} s (rc {nodes[1].returncode}); "
          f"left running: {left}")
    assert [n.returncode != 0 for n in nodes] == [True, True] and left == [[], []]
    assert max(took.values()) < 30, took


SSH_TOOLS = ("/usr/sbin/sshd", "pdsh", "ssh", "ssh-keygen", "ip")


def _ssh_test_skip_reason() -> str:
    import shutil

    if os.environ.get("DS_VLM_SSH_TEST") != "1":
        return "opt-in: DS_VLM_SSH_TEST=1 (needs root and `apt-get install openssh-server pdsh`)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    missing = [t for t in SSH_TOOLS if not shutil.which(t)]
    return f"missing {missing}: apt-get install openssh-server pdsh iproute2" if missing else ""


@pytest.fixture
def two_hosts(tmp_path):
    """Two network namespaces joined by a veth pair (interface `dsvlm0`, 10.77.0.1 and 10.77.0.2), each with
    its own sshd that accepts a fresh key for root. Yields (namespace of host 1, ssh options, addresses)."""
    tag = f"dsvlm{os.getpid() % 100000}"
    namespaces, sshds = [f"{tag}a", f"{tag}b"], []
    addresses = ["10.77.0.1", "10.77.0.2"]
    keys = tmp_path / "ssh"
    keys.mkdir()

    def sh(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)

    try:
        for name in ("host_key", "user_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name))
        (keys / "authorized_keys").write_text((keys / "user_key.pub").read_text())
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        for ns in namespaces:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")
        for ns, end, address in zip(namespaces, (f"{tag}x", f"{tag}y"), addresses):
            sh("ip", "link", "set", end, "netns", ns)
            sh("ip", "-n", ns, "link", "set", end, "name", "dsvlm0")
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "dsvlm0")
            sh("ip", "-n", ns, "link", "set", "dsvlm0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            config = keys / f"sshd_{ns}.conf"
            config.write_text(f"ListenAddress {address}\nPort 22\nHostKey {keys / 'host_key'}\n"
                              f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                              "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                              f"StrictModes no\nPidFile {keys / ns}.pid\n")
            sshds.append(subprocess.Popen(["ip", "netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                          stdout=subprocess.DEVNULL, stderr=open(keys / f"sshd_{ns}.log", "w"),
                                          start_new_session=True))
        options = (f"-i {keys / 'user_key'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                   "-o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=5")
        deadline = time.monotonic() + 30
        for address in addresses:
            while subprocess.run(["ip", "netns", "exec", namespaces[0], "ssh", *options.split(), address, "true"],
                                 capture_output=True, timeout=30).returncode != 0:
                assert time.monotonic() < deadline, f"sshd on {address} not reachable"
                time.sleep(0.5)
        yield namespaces[0], options, addresses
    finally:
        for sshd in sshds:  # the ranks run under sshd's sessions: end them with it
            try:
                family = psutil.Process(sshd.pid).children(recursive=True)
            except psutil.Error:
                family = []
            for proc in [*family, sshd]:
                try:
                    proc.kill()
                except (psutil.Error, OSError):
                    pass
            sshd.wait(timeout=10)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.skipif(bool(_ssh_test_skip_reason()), reason=_ssh_test_skip_reason() or "runs")
def test_ssh_pdsh_hostfile_launch_between_two_network_namespaces(demo_dir, tmp_path, spawn, two_hosts):
    """DeepSpeed's default multi-node path for real: the recipe script with HOSTFILE, run once in host 1's
    namespace; the runner starts both nodes with pdsh over ssh; they meet at 10.77.0.1 over the veth link and
    train as one world, with the losses of one `--num_gpus 2` launcher."""
    namespace, ssh_options, addresses = two_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in addresses))
    ds_env = tmp_path / "deepspeed_env"  # variables the runner exports to the remote ranks (beyond NCCL_*, PYTHON*)
    ds_env.write_text("OMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=dsvlm0\n")
    single_out, ssh_out = tmp_path / "single", tmp_path / "ssh"

    single = spawn(["bash", str(RECIPE), *TINY], "single",
                   launch_env(NUM_GPUS=2, MASTER_PORT=free_port(), **_recipe_tiny(demo_dir, single_out)))
    _wait_all([single], timeout=300)
    assert single.returncode == 0, _tail(single)

    venv = {"VIRTUAL_ENV": sys.prefix} if sys.prefix != sys.base_prefix else {}
    run = spawn(["ip", "netns", "exec", namespace, "bash", str(RECIPE), *TINY], "ssh",
                launch_env(HOSTFILE=hostfile, MASTER_ADDR=addresses[0], MASTER_PORT=29500,
                           LAUNCHER_ARGS="--no_ssh_check", PDSH_SSH_ARGS_APPEND=ssh_options, DS_ENV_FILE=ds_env,
                           **venv, **_recipe_tiny(demo_dir, ssh_out)))
    _wait_all([run], timeout=400)
    log = run.log.read_text()
    assert run.returncode == 0, log[-6000:]
    assert "cmd = pdsh" in log
    for rank, address in enumerate(addresses):
        assert f"{address}: " in log and f"nnodes=2, num_local_procs=1, node_rank={rank}" in log
    one, two = read_metrics(single_out), read_metrics(ssh_out)
    print(f"\nssh/pdsh losses: {[round(r['loss'], 6) for r in two]}\none launcher:    "
          f"{[round(r['loss'], 6) for r in one]}")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)) < 1e-4
