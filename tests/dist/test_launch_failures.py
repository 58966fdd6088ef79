"""Multi-node runs that fail or are stopped, on one machine through the DeepSpeed launcher: a node that never
joins, a killed rank, Ctrl-C; each ends promptly and leaves no process. Starting runs: test_launch.py."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from fixtures.launching import (
    MULTINODE,
    RECIPE,
    TINY,
    left_running,
    recipe_tiny,
    trainer_ranks,
    two_node_env,
    unresolved_hostfile,
    wait_all,
    wait_for_steps,
)
from fixtures.runs import ROOT, RUNNER, free_port, launch_env, read_metrics


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
                      f"alone{r}", two_node_env(tmp_path, r, free_port()))
             for r in (0, 1)}
    took = wait_all(list(alone.values()), timeout=timeout_s + 150)
    print(f"\nnever-joining node: node 0 ended after {took[alone[0].pid]:.1f} s, node 1 after "
          f"{took[alone[1].pid]:.1f} s (--dist_timeout_s {timeout_s}, process start-up included)")
    node0, node1 = alone[0].log.read_text(), alone[1].log.read_text()
    assert alone[0].returncode != 0 and alone[1].returncode != 0
    assert re.search(r"ds-vlm: error: only 1 of 2 ranks joined the rendezvous at 127\.0\.0\.1:\d+ within 8 s: "
                     r"a node did not join", node0), node0[-3000:]
    assert re.search(r"ds-vlm: error: rank 1 could not reach the master \(node 0\) at 127\.0\.0\.1:\d+ "
                     r"\(--dist_timeout_s 8\): node 0 did not start", node1), node1[-3000:]
    for proc in alone.values():
        assert left_running(proc.pid) == []


@pytest.mark.waits
def test_killed_rank_stops_the_other_node_promptly(demo_dir, tmp_path, spawn):
    """kill -9 the rank of node 1 mid-run: both launchers exit non-zero within seconds (gloo sees the peer
    gone), far sooner than --dist_timeout_s (60), and nothing is left running."""
    out, port, hostfile = tmp_path / "run", free_port(), unresolved_hostfile(tmp_path)
    nodes = [spawn([*RUNNER, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r), "--master_addr",
                    "127.0.0.1", "--master_port", str(port), "launch/train.py",
                    *_tiny_flags(demo_dir, out, "--max_steps", "5000")], f"node{r}", launch_env())
             for r in (0, 1)]
    wait_for_steps(out, 2, nodes)
    ranks = trainer_ranks(nodes)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1].pid, signal.SIGKILL)
    took = wait_all(nodes, timeout=45)
    print(f"\nrank 1 killed: node 1's launcher exited after {took[nodes[1].pid]:.1f} s (rc {nodes[1].returncode}), "
          f"node 0's after {took[nodes[0].pid]:.1f} s (rc {nodes[0].returncode})")
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert max(took.values()) < 30, took
    for node in nodes:
        assert left_running(node.pid) == []
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
                   two_node_env(tmp_path, r, port, GPUS_PER_NODE=1, **recipe_tiny(demo_dir, out)),
                   terminal=r == 0)
             for r in (0, 1)]
    wait_for_steps(out, 2, nodes)
    assert sorted(trainer_ranks(nodes)) == [0, 1]
    os.write(nodes[0].terminal, b"\x03")
    os.kill(nodes[1].pid, signal.SIGINT)
    took = wait_all(nodes, timeout=45)
    left = [left_running(node.pid) for node in nodes]
    print(f"\nCtrl-C in node 0's terminal: exited after {took[nodes[0].pid]:.1f} s (rc {nodes[0].returncode}); "
          f"SIGINT to node 1's script: exited after {took[nodes[1].pid]:.1f} s (rc {nodes[1].returncode}); "
          f"left running: {left}")
    assert [n.returncode != 0 for n in nodes] == [True, True] and left == [[], []]
    assert max(took.values()) < 30, took
