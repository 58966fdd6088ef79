"""Processes: the rendezvous (with errors that say what failed), CPU threads, DeepSpeed's shared memory."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


class RendezvousError(RuntimeError):
    """Not every rank reached the rendezvous within --dist_timeout_s (a node did not join)."""


def setup_threads() -> None:
    """On CPU, give each local rank its share of the cores (the default oversubscribes badly)."""
    if torch.cuda.is_available():
        return
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores // max(1, local_ranks)))


def init_distributed(timeout_s: int) -> None:
    """deepspeed.init_distributed; a rendezvous that fails (a node never joined, the master never came up)
    becomes one RendezvousError that says so. --dist_timeout_s bounds the rendezvous as well: the master's
    store waits that long for every rank; the other ranks try that long to reach it (torch retries once)."""
    import re

    import deepspeed

    if torch.cuda.is_available():  # before any collective: NCCL's object collectives (preflight) use this device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        deepspeed.init_distributed(dist_backend=None, timeout=timedelta(seconds=timeout_s))
    except dist.DistError as err:  # DistStoreError / DistNetworkError from the TCPStore rendezvous
        env = os.environ.get
        where = f"{env('MASTER_ADDR', '?')}:{env('MASTER_PORT', '?')}"
        joined = re.search(r"(\d+)/(\d+) clients joined", str(err))
        if "EADDRINUSE" in str(err) or "address already in use" in str(err).lower():
            raise RendezvousError(
                f"port {env('MASTER_PORT', '?')} on node 0 ({env('MASTER_ADDR', '?')}) is already in use: another job "
                f"or a process left over from an earlier run holds it. Pick another --master_port (MASTER_PORT in the "
                f"recipes), or find the holder with `ss -ltnp | grep {env('MASTER_PORT', '')}`.") from err
        if joined:
            what = (f"only {joined[1]} of {joined[2]} ranks joined the rendezvous at {where} within {timeout_s} s: "
                    f"a node did not join")
        else:
            what = (f"rank {env('RANK', '?')} could not reach the master (node 0) at {where} "
                    f"(--dist_timeout_s {timeout_s}): node 0 did not start or cannot be reached")
        raise RendezvousError(
            f"{what}. Start the launcher on every node with the same hostfile, --master_addr and --master_port, "
            f"check that the port is open between the nodes, and raise --dist_timeout_s if nodes start far apart. "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0]})") from err


def release_shm_buffer() -> None:
    """On CPU with every rank on one node, DeepSpeed's shared-memory allreduce creates one ~70 MB
    /dev/shm file per rank and never removes it (RAM, filling up run after run). Once init has
    returned on every rank all of them are mapped, so each rank unlinks its own: the memory goes
    when the run ends, even on kill -9."""
    if torch.cuda.is_available() or not os.path.isdir("/dev/shm"):
        return
    dist.barrier()
    env = os.environ.get
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{env('MASTER_ADDR', '')}_{env('MASTER_PORT', '')}_"
            f"{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass
