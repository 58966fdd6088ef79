"""Processes: the rendezvous (with errors that say what failed), CPU threads, DeepSpeed's shared memory, and
every collective ds-vlm runs itself.

Collectives: NCCL takes only CUDA tensors, gloo CPU ones, and a tensor on the wrong device fails only on the
hardware whose backend refuses it (a CPU tensor on the default group of an NCCL job raises "No backend type
associated with device type cpu"; gloo on a CPU accepts it, so no CPU test would see the mistake). So no
module of ds_vlm calls `torch.distributed` collectives directly (a test enforces it): they call the helpers
here, which put each tensor on the communication device of the group they use (`comm_device`) and bring
the result back where the caller keeps it.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist


class RendezvousError(RuntimeError):
    """Not every rank reached the rendezvous within --dist_timeout_s (a node did not join)."""


def setup_threads() -> None:
    """On CPU, give each local rank its share of the cores (the default oversubscribes badly)."""
    if torch.cuda.is_available():
        return
    torch.set_num_threads(cores_per_local_rank())


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cores_per_local_rank() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world_size()))


def default_loader_workers(cuda: Optional[bool] = None) -> int:
    """DataLoader workers per rank when --num_workers is -1. On a GPU each worker decodes and processes
    images while the rank's own core drives the GPU: the rank's share of the cores less one, at most 8 (about
    10 Pokemon-sized images a second per worker were measured on a CPU core; docs/training.md). On a CPU the
    ranks compute on those cores themselves: 1."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return max(1, min(8, cores_per_local_rank() - 1)) if cuda else 1


def clear_stale_build_lock(op_name: str, min_age_s: float = 60.0) -> Optional[str]:
    """A JIT build of a DeepSpeed op that was killed (a timeout, Ctrl-C, a preempted job) leaves torch's lock file
    in the op's build folder, and every later start waits on it forever, silently, before any watchdog runs.
    The lock holds no process id: it is stale when it is older than `min_age_s` and no process works in that
    folder (ninja and the compilers run there). Removed, and said; returns its path (None if there was none)."""
    import psutil
    from torch.utils.cpp_extension import _get_build_directory

    folder = os.path.realpath(_get_build_directory(op_name, verbose=False))
    lock = os.path.join(folder, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except FileNotFoundError:
        return None
    if age < min_age_s:
        return None
    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd")
        if cwd and os.path.realpath(cwd).startswith(folder):
            return None  # a build is running
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock)
        from ds_vlm.runtime.console import say_once

        say_once(f"removed a stale build lock {lock} ({age:.0f} s old, no build running): a build of {op_name} was "
                 "killed; it is built again")
    return lock


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous on 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_defaults() -> None:
    """Started without a launcher (`ds-vlm train ...`, `python launch/train.py ...`): one rank on this machine,
    instead of DeepSpeed's MPI discovery (which needs mpi4py and an MPI launcher)."""
    launched = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
    if any(name in os.environ for name in launched):
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def use_expandable_segments() -> None:
    """PyTorch's allocator grows its segments in place instead of caching fixed blocks, unless the user chose
    (PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF): packed and token-budget batches change shape every step, and
    fixed blocks then fragment the memory --max_tokens_per_batch auto plans to 90% of. Read when the allocator
    starts: before the first CUDA call."""
    if not any(os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def init_distributed(timeout_s: int) -> None:
    """deepspeed.init_distributed; a rendezvous that fails (a node never joined, the master never came up)
    becomes one RendezvousError that says so. --dist_timeout_s bounds the rendezvous as well: the master's
    store waits that long for every rank; the other ranks try that long to reach it (torch retries once)."""
    import re

    import deepspeed

    from ds_vlm.patches.deepspeed_startup import trim_deepspeed_startup

    trim_deepspeed_startup()
    single_process_defaults()
    clear_stale_build_lock("deepspeed_shm_comm")
    if torch.cuda.is_available():  # before any collective: NCCL's object collectives (preflight) use this device
        use_expandable_segments()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's "... shm_comm_op built successfully" per rank
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
    barrier()
    env = os.environ.get
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{env('MASTER_ADDR', '')}_{env('MASTER_PORT', '')}_"
            f"{rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- who we are


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def backend(group=None) -> str:
    return str(dist.get_backend(group)) if is_distributed() else "none"


# --------------------------------------------------------------------------- collectives


def backend_device_type(backend: str) -> str:
    """The device type a backend communicates tensors on: "cuda" for NCCL (and its relatives), else "cpu"."""
    backend = str(backend).lower()
    return "cuda" if any(name in backend for name in ("nccl", "hccl", "rccl")) else "cpu"


def comm_device(group=None) -> torch.device:
    """Where a tensor must be for a collective on `group` (None: the default group): the current CUDA device for
    NCCL, the CPU for gloo."""
    if backend_device_type(dist.get_backend(group)) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _CopyBack:
    """The work of a collective run on a copy of the caller's tensor: waiting copies the result back."""

    def __init__(self, work, moved: torch.Tensor, original: torch.Tensor):
        self.work, self.moved, self.original = work, moved, original

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
        self.original.copy_(self.moved)
        return True


def _run(collective, tensor: torch.Tensor, group, async_op: bool, **kwargs):
    """`collective(t, ...)` on `tensor` where `group` communicates; the result lands in `tensor`."""
    if not is_distributed():
        return None
    device = comm_device(group)
    moved = tensor if tensor.device == device else tensor.to(device)
    work = collective(moved, group=group, async_op=async_op, **kwargs)
    if moved is tensor:
        return work
    copy = _CopyBack(work, moved, tensor)
    if async_op:
        return copy
    copy.wait()
    return None


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None, async_op: bool = False):
    """Reduce `tensor` over the ranks of `group` in place (op: sum, min or max). With async_op, returns a work
    handle whose wait() completes it (None outside a process group)."""
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    return _run(dist.all_reduce, tensor, group, async_op, op=reduce_op)


def broadcast(tensor: torch.Tensor, src: int = 0, group=None, async_op: bool = False):
    """`tensor` from global rank `src` to every rank of `group`, in place."""
    return _run(dist.broadcast, tensor, group, async_op, src=src)


def all_to_all(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """`tensor` split evenly on dim 0, chunk i sent to rank i of `group`; returns the chunks received (chunk i from
    rank i) on `tensor`'s device. The tensor itself outside a process group."""
    if not is_distributed():
        return tensor
    device = comm_device(group)
    sent = tensor.to(device).contiguous()
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=group)
    return received.to(tensor.device)


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape everywhere), in `group`'s rank order, on `tensor`'s device; [tensor]
    outside a process group."""
    if not is_distributed():
        return [tensor]
    device = comm_device(group)
    sent = tensor.to(device).contiguous()
    parts = [torch.empty_like(sent) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, sent, group=group)
    return [p.to(tensor.device) for p in parts]


def barrier(group=None) -> None:
    if not is_distributed():
        return
    if backend_device_type(dist.get_backend(group)) == "cuda":
        # NCCL's barrier guesses a device from the rank; name the one this rank uses
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


_store_waits = 0  # store_barrier calls so far: every rank makes them in the same order


def store_barrier(what: str, timeout_s: float, poll_s: float = 0.2) -> None:
    """Wait until every rank has arrived, through the rendezvous store rank 0 hosts, not a collective: for the
    waits on one rank's long work (rank 0 writing an export or converting a checkpoint; a rank writing its
    checkpoint shards) that may outlast --dist_timeout_s, which NCCL would enforce on the ranks waiting in a
    barrier. `timeout_s` (--long_phase_timeout_s) bounds it; `what` names the wait in its error."""
    global _store_waits
    if not is_distributed():
        return
    _store_waits += 1
    key = f"ds_vlm/wait/{_store_waits}"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(), is_master=False,
                          timeout=timedelta(seconds=60), wait_for_workers=False)
    arrived, deadline = store.add(key, 1), time.monotonic() + timeout_s
    while arrived < world_size():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank()}: {arrived} of {world_size()} ranks finished {what} within "
                               f"{timeout_s:.0f} s (--long_phase_timeout_s)")
        time.sleep(poll_s)
        arrived = store.add(key, 0)
    # Rank 0 hosts the store and leaves last: the last rank to arrive goes on at once, and when that is rank 0
    # and this wait is a run's last (after the export), it exits and takes the store with it while the others
    # still poll ("Connection reset by peer" on a loaded machine).
    left = store.add(f"{key}/left", 1)
    while rank() == 0 and left < world_size() and time.monotonic() < deadline:
        time.sleep(poll_s / 4)
        left = store.add(f"{key}/left", 0)


def all_gather_object(obj: Any, group=None) -> list:
    """Every rank's `obj`, in rank order (pickled; NCCL moves it through this rank's current CUDA device)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Global rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    shared = [obj]
    dist.broadcast_object_list(shared, src=src, group=group, device=comm_device(group))
    return shared[0]


def all_ok(ok: bool, src_rank_decides: bool = False, group=None) -> bool:
    """Whether every rank of `group` is ok (or, with src_rank_decides, what rank 0 says), on every rank."""
    flag = torch.tensor([1.0 if ok else 0.0])
    if src_rank_decides:
        broadcast(flag, src=0, group=group)
    else:
        all_reduce(flag, op="min", group=group)
    return bool(flag.item())
