"""Two costs of every DeepSpeed start that buy ds-vlm nothing (measured with py-spy on 2 CPU ranks; see
docs/design.md). `trim_deepspeed_startup` installs both; `init_distributed` (runtime/distributed.py) calls it
before DeepSpeed initialises anything."""

from __future__ import annotations

import functools
import sys

from ds_vlm.patches import attribute, patch

MUON_IMPORT = patch(
    "deepspeed_muon_import_uncompiled", library="deepspeed, torch", versions="deepspeed 0.19.8, torch 2.14.1",
    target="deepspeed.runtime.compiler.compile while deepspeed.runtime.zero.muon.muon_optimizer is imported: "
           "the torch.compile decoration deferred to each function's first call (eager on a CPU)",
    reason="ZeRO imports DeepSpeed's Muon module to ask whether the optimizer is one (an isinstance check); the "
           "module decorates three functions with torch.compile at import, and the decoration alone loads "
           "torch._inductor (~2 s a rank; ~4 s with two ranks on two cores). A Muon run on a CPU runs them eagerly "
           "(compiling them there outlasted a 120 s --dist_timeout_s on 2 loaded cores)",
    scope="init_distributed, once a process; `compiler.compile` is restored as soon as the import is done")

CPUINFO_ONCE = patch(
    "cpuinfo_asked_once", library="deepspeed (py-cpuinfo, which its op builders ask)",
    versions="deepspeed 0.19.8, py-cpuinfo 9.0.0",
    target="cpuinfo.get_cpu_info wrapped in an lru_cache",
    reason="each DeepSpeed op load asks py-cpuinfo for the CPU's flags, which starts a new Python process each "
           "time (four a rank, ~1 s); the answer cannot change within a process",
    scope="init_distributed; kept for the process (idempotent)")


def _deferred_compile():
    import torch

    def decorate(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:  # eager on a CPU: inductor's C++ build of Newton-Schulz took minutes
                compiled = torch.compile(fn) if torch.cuda.is_available() else fn
            return compiled(*args, **kwargs)

        return call

    return decorate


def trim_deepspeed_startup() -> None:
    """MUON_IMPORT (the functions and classes stay DeepSpeed's own, and nothing of Muon runs in an AdamW run)
    and CPUINFO_ONCE."""
    if "deepspeed.runtime.zero.muon.muon_optimizer" not in sys.modules:
        from deepspeed.runtime import compiler

        with attribute(compiler, "compile", _deferred_compile):
            try:
                import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
            except ImportError:
                pass
    try:
        import cpuinfo
    except ImportError:
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)
