"""Measured memory per logged step: what `peak_mem_gb`, `peak_reserved_gb` and `peak_tensor_gb` in metrics.jsonl
report.

- On CUDA: the allocator's own statistics, reset at each logged step's start: `max_memory_allocated` (both
  peak_mem_gb and peak_tensor_gb: every tensor is the allocator's) and `max_memory_reserved`.
- On a CPU: peak_mem_gb is the process's peak RSS (VmHWM, reset through /proc/self/clear_refs), which counts
  the interpreter, libraries and freed-but-kept heap too. With `--measure_memory`, peak_tensor_gb is the peak of
  live tensor storage over the step: the bytes alive at its start (every CPU tensor storage the interpreter
  can reach, found by walking the garbage collector's objects: the weights, DeepSpeed's flat buffers and
  partitions, the optimizer states, the gradients) plus the running sum of the step's allocations and
  releases as the CPU allocator reports them to torch.profiler (`profile_memory=True`). Off by default: the
  profiler slows a step.

This is a measurement of the real run (the real allocator's events, DeepSpeed's real buffers), kept apart from
the planner's fake-tensor trace (ds_vlm/memplan/trace.py) so that the one can check the other. Allocations on
threads other than the step's are not seen by the profiler (on a CPU, DeepSpeed and autograd allocate on the
calling thread); `TensorMeter.closing_gap` is the check: the bytes the running sum ends at against a fresh
walk at the step's end.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Optional


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak RSS (VmHWM)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_memory_gb() -> tuple[float, float]:
    """(peak allocated, peak reserved) GPU memory since the last `reset_peak_memory`; on a CPU (peak RSS, 0)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9, 0.0
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 0.0  # KiB on Linux, since start


def reachable_tensor_bytes(extra=()) -> int:
    """Bytes of every distinct CPU tensor storage reachable from Python now (each storage once, however many
    tensors view it), plus those under `extra` tensors (parameters' gradients may have no Python object yet)."""
    import torch

    sizes: dict[int, int] = {}

    def add(tensor) -> None:
        try:
            if tensor.device.type != "cpu" or type(tensor).__name__ == "FakeTensor":
                return
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # meta, sparse, subclasses without storage
            return
        if ptr:
            sizes[ptr] = max(sizes.get(ptr, 0), storage.nbytes())

    with warnings.catch_warnings():  # isinstance on some objects (deprecated module attributes) warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                add(obj)
    for tensor in extra:
        add(tensor)
        if getattr(tensor, "grad", None) is not None:
            add(tensor.grad)
        if getattr(tensor, "ds_tensor", None) is not None:  # ZeRO-3's partition of a parameter
            add(tensor.ds_tensor)
    return sum(sizes.values())


class TensorMeter:
    """--measure_memory on a CPU: the peak of live tensor bytes between `start` and `stop` (module docstring)."""

    def __init__(self, parameters=()):
        self.parameters = list(parameters)
        self.baseline = 0
        self._end = 0  # where the running sum ended
        self._profiler = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before the profiler's first start: errors only
        self.baseline = reachable_tensor_bytes(self.parameters)
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():  # Kineto writes two lines to the process's stderr at every start and stop
            self._profiler.__enter__()

    def stop(self) -> int:
        """The step's peak of live tensor bytes."""
        profiler, self._profiler = self._profiler, None
        with _quiet_stderr():
            profiler.__exit__(None, None, None)
        events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
        live = peak = self.baseline
        for _, size in events:
            live += size
            peak = max(peak, live)
        self._end = live
        return peak

    @property
    def closing_gap(self) -> int:
        """Bytes: where the last step's running sum ended against a fresh walk now (0: every release was seen);
        walked when asked, not in the step."""
        return self._end - reachable_tensor_bytes(self.parameters)


@contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the duration (C++ code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class MemoryMeter:
    """What a logged step reports: (peak_mem_gb, peak_reserved_gb, peak_tensor_gb), the last 0 where unknown
    (a CPU run without --measure_memory)."""

    def __init__(self, measure: bool = False, parameters=()):
        import torch

        self.cuda = torch.cuda.is_available()
        self.tensors: Optional[TensorMeter] = TensorMeter(parameters) if measure and not self.cuda else None

    def start(self) -> None:
        reset_peak_memory()
        if self.tensors is not None:
            self.tensors.start()

    def read(self) -> tuple[float, float, float]:
        tensor = self.tensors.stop() / 1e9 if self.tensors is not None else 0.0
        peak, reserved = peak_memory_gb()
        return peak, reserved, (peak if self.cuda else tensor)
