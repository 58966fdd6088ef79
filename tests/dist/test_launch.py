"""Multi-node runs on one machine through the DeepSpeed launcher: two launchers as two nodes (and ZeRO++ on two nodes
of two ranks), and (opt-in) ssh + pdsh between two network namespaces. Failures: test_launch_failures.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from fixtures.launching import RECIPE, TINY, recipe_tiny, tail, two_node_env, wait_all
from fixtures.runs import free_port, launch_env, read_metrics


def test_two_launchers_as_two_nodes_match_one_launcher(demo_dir, tmp_path, spawn):
    """The recipe script on one launcher (NUM_GPUS=2), then as node 0 and node 1 (NODE_RANK=0/1: two launchers
    with --no_ssh meeting on 127.0.0.1): one world of 2 ranks, the same losses step by step. Then ZeRO++ with
    hpZ on two nodes of 2 ranks: the same losses again."""
    single_out, two_out = tmp_path / "single", tmp_path / "two"
    single = spawn(["bash", str(RECIPE), *TINY], "single",
                   launch_env(NUM_GPUS=2, MASTER_PORT=free_port(), **recipe_tiny(demo_dir, single_out)))
    wait_all([single], timeout=300)
    assert single.returncode == 0, tail(single)

    port = free_port()
    nodes = [spawn(["bash", str(RECIPE), *TINY], f"node{r}",
                   two_node_env(tmp_path, r, port, GPUS_PER_NODE=1, **recipe_tiny(demo_dir, two_out)))
             for r in (0, 1)]
    wait_all(nodes, timeout=300)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(tail(n) for n in nodes)
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
                              GPUS_PER_NODE=2, **recipe_tiny(demo_dir, pp_out)))
             for r in (0, 1)]
    wait_all(nodes, timeout=300)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(tail(n) for n in nodes)
    run = json.loads((pp_out / "run_config.json").read_text())
    zero = run["ds_config"]["zero_optimization"]
    assert run["world_size"] == 4 and zero["stage"] == 3 and zero["zero_hpz_partition_size"] == 2, zero
    assert zero["zero_quantized_weights"] is zero["zero_quantized_gradients"] is False
    pp = read_metrics(pp_out)
    print(f"losses ZeRO++ 2x2:    {[round(r['loss'], 6) for r in pp]}")
    assert [r["step"] for r in pp] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, pp)) < 1e-4, (one, pp)



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
                   launch_env(NUM_GPUS=2, MASTER_PORT=free_port(), **recipe_tiny(demo_dir, single_out)))
    wait_all([single], timeout=300)
    assert single.returncode == 0, tail(single)

    venv = {"VIRTUAL_ENV": sys.prefix} if sys.prefix != sys.base_prefix else {}
    run = spawn(["ip", "netns", "exec", namespace, "bash", str(RECIPE), *TINY], "ssh",
                launch_env(HOSTFILE=hostfile, MASTER_ADDR=addresses[0], MASTER_PORT=29500,
                           LAUNCHER_ARGS="--no_ssh_check", PDSH_SSH_ARGS_APPEND=ssh_options, DS_ENV_FILE=ds_env,
                           **venv, **recipe_tiny(demo_dir, ssh_out)))
    wait_all([run], timeout=400)
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
