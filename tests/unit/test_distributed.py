"""Collectives in one place, on the communication device of their group; the loader's workers from the cores."""

from __future__ import annotations

import re

import torch
from fixtures.runs import ROOT

import ds_vlm.runtime.distributed as distributed

COLLECTIVES = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|broadcast|all_gather\w*|reduce_scatter\w*|"
                         r"all_to_all\w*|barrier|gather|scatter|reduce|broadcast_object_list|send|recv)\(")


def test_every_collective_goes_through_distributed_py():
    """A collective called directly elsewhere would put whatever tensor it has on the wire: the bug of a CPU
    tensor on the default group of an NCCL job, which gloo accepts and no CPU test sees."""
    offenders = []
    for path in sorted((ROOT / "ds_vlm").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() == "ds_vlm/runtime/distributed.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if COLLECTIVES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_communication_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "gloo")
    assert distributed.comm_device() == torch.device("cpu")
    assert distributed.backend_device_type("cpu:gloo,cuda:nccl") == "cuda"


def test_a_collective_runs_on_the_group_device_and_lands_where_the_caller_keeps_it(monkeypatch):
    """What `_run` does when the caller's tensor lives elsewhere than the group communicates (a CPU tensor on
    NCCL): a copy goes on the wire, and the result comes back into the caller's tensor (waited for, or on
    wait() of the returned handle). Simulated with float64 standing for "the other device"."""
    seen = []

    def fake_all_reduce(tensor, group=None, async_op=False, op=None):
        seen.append(tensor.dtype)
        tensor.mul_(2)
        return None

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device: self.double() if device == "other" else self)
    monkeypatch.setattr(distributed, "comm_device", lambda group=None: "other")
    flag = torch.tensor([1.0, 3.0])
    distributed.all_reduce(flag)
    assert seen == [torch.float64] and flag.tolist() == [2.0, 6.0]
    work = distributed.all_reduce(flag, async_op=True)
    assert flag.tolist() == [2.0, 6.0]  # not yet copied back
    work.wait()
    assert flag.tolist() == [4.0, 12.0]


def test_loader_workers_come_from_the_cores_per_local_rank(monkeypatch):
    from ds_vlm.config import DataConfig

    monkeypatch.setenv("LOCAL_SIZE", "8")
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert distributed.default_loader_workers(cuda=True) == 8  # 12 cores a rank: 11, at most 8
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(24)), raising=False)
    assert distributed.default_loader_workers(cuda=True) == 2  # 3 cores a rank, one for the rank itself
    assert distributed.default_loader_workers(cuda=False) == 1  # CPU ranks compute on their cores
    assert DataConfig(num_workers=3).loader_workers == 3


def test_deepspeed_startup_is_trimmed_without_changing_what_runs():
    """After the trim, ZeRO's optimizer check finds Muon's module already imported with its torch.compile
    deferred to the first call (torch._inductor not loaded), its functions are DeepSpeed's own, an AdamW still
    counts as ZeRO-supported, and py-cpuinfo runs its probe once however often it is asked."""
    import subprocess
    import sys

    code = """
import sys
from unittest import mock
import cpuinfo
from ds_vlm.patches.deepspeed_startup import trim_deepspeed_startup
trim_deepspeed_startup()
from deepspeed.runtime.zero import utils
from deepspeed.runtime.zero.muon import original_muon
import torch
print("inductor", "torch._inductor" in sys.modules)
with mock.patch.object(utils.dist, "get_rank", lambda: 1):
    print("supported", utils.is_zero_supported_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])))
print("own", original_muon.zeropower_via_newtonschulz5.__wrapped__.__module__)
flags = [len(cpuinfo.get_cpu_info().get("flags", [])) for _ in range(3)]
print("cpuinfo", cpuinfo.get_cpu_info.cache_info().misses, len(set(flags)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if not line.startswith("["))
    assert said == {"inductor": "False", "supported": "True", "own": "deepspeed.runtime.zero.muon.original_muon",
                    "cpuinfo": "1 1"}


def test_a_run_without_a_launcher_is_one_rank(monkeypatch):
    """`ds-vlm train` started by hand: one local rank on a free port (not DeepSpeed's MPI discovery); under a
    launcher (RANK set, or MPI's or SLURM's variables) nothing is touched."""
    import os

    from ds_vlm.runtime.distributed import single_process_defaults

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    single_process_defaults()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    single_process_defaults()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "8")


def test_a_stale_jit_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """A JIT build killed midway leaves torch's lock file, on which every later start would wait forever: older
    than a minute with no process working in the op's build folder, it is removed; a fresh one, or one whose
    build is still running (a process in that folder), is left to torch's own wait."""
    import os
    import subprocess
    import sys
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "fused_adam"
    folder.mkdir()
    lock = folder / "lock"
    assert distributed.clear_stale_build_lock("fused_adam") is None  # no lock
    lock.write_text("")
    assert distributed.clear_stale_build_lock("fused_adam") is None and lock.exists()  # fresh: a build may be starting
    old = time.time() - 600
    os.utime(lock, (old, old))
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=folder)
    try:
        deadline = time.monotonic() + 10
        while not any(p.info["cwd"] == str(folder) for p in distributed_procs()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert distributed.clear_stale_build_lock("fused_adam") is None and lock.exists()  # a build runs there
    finally:
        builder.kill()
        builder.wait()
    assert distributed.clear_stale_build_lock("fused_adam") == str(folder / "lock") and not lock.exists()


def distributed_procs():
    import psutil

    return list(psutil.process_iter(["cwd"]))


def test_store_barrier_waits_for_every_rank_through_the_store(monkeypatch):
    """store_barrier: a rank returns only when every rank has arrived, counted in the rendezvous store (rank 0
    writing an export may outlast NCCL's timeout; nothing here is a collective); past its timeout it names how
    many arrived."""
    import threading
    from datetime import timedelta

    import pytest
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(master.port))
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "rank", lambda group=None: 0)
    monkeypatch.setattr(distributed, "_store_waits", 0)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (distributed.store_barrier("a test", 30, poll_s=0.01), done.set()))
    waiter.start()
    assert not done.wait(0.5)  # one of two ranks arrived: it waits
    master.add("ds_vlm/wait/1", 1)  # the other rank arrives (its call would be its first store_barrier too)
    assert not done.wait(0.5)  # rank 0 hosts the store: it leaves only once the other rank has left the wait
    master.add("ds_vlm/wait/1/left", 1)
    assert done.wait(10)
    waiter.join()
    with pytest.raises(TimeoutError, match="1 of 2 ranks finished a lonely wait within 0 s"):
        distributed.store_barrier("a lonely wait", 0.2, poll_s=0.01)
