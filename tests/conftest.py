"""The suite's collection hook (the `dist` and xdist-group marks). Its fixtures and helpers live in modules of
their own under tests/fixtures/ (runs, datasets, encoding, numerics); tests import the helpers from there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

pytest_plugins = ["fixtures.runs", "fixtures.datasets", "fixtures.encoding", "fixtures.launching"]


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marker
def pytest_collection_modifyitems(config, items):
    """Every test under tests/dist/ launches real multi-process runs: marked `dist` (`-m "not dist"` is the fast,
    in-process tier under tests/unit/). Under pytest-xdist (`-n 3 --dist loadgroup`, pyproject's addopts) the
    multi-rank tests of one module run on one worker, one after another (xdist group: the module's name), so a module
    fixture's run (a family's training run, a checkpointed run that tests then resume) is made once, not once per
    worker; the modules themselves, the in-process tier and the tests marked `waits` (most of their time is spent
    waiting on a timeout, a stopped rank or a node that never comes) spread over the workers. (All multi-rank tests
    on one worker took 17 min 41 s for 484 tests on 2 cores, 2026-12-07; most of a run's time is not computing.)"""
    for item in items:
        path = Path(str(item.fspath)).relative_to(TESTS)
        if "dist" in path.parts[:1]:
            item.add_marker(pytest.mark.dist)
            if item.get_closest_marker("waits") is None:
                item.add_marker(pytest.mark.xdist_group(path.stem))


def pytest_configure(config):
    """On an xdist worker: torch's threads are the cores shared out among the workers (two workers of two threads
    each on two cores spin against each other: the in-process tier took 2 min 39 s so, 74 s with one thread each).
    The multi-rank tests' ranks run with OMP_NUM_THREADS=1 (fixtures/runs.py) whatever this says."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if getattr(config, "workerinput", None) is not None and workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    check_loadgroup(config)


def check_loadgroup(config):
    """Under `--dist loadgroup` (pyproject's addopts), xdist groups a test by appending `@group` to its node id
    (`item._nodeid`); pytest 9.2 computes node ids otherwise and the groups are lost without a word: a module's tests
    then spread over the workers, and its module fixtures (a family's training run) run once per worker.
    constraints.txt pins pytest 9.1.1; a pytest where xdist's way does not hold stops the run here, saying so."""
    if getattr(config, "workerinput", None) is not None or config.getoption("dist", default="no") != "loadgroup":
        return

    class Probe(pytest.Item):
        def runtest(self):
            pass

    probe = object.__new__(Probe)  # what xdist's worker does to each grouped item
    probe._nodeid = "probe@group"
    try:
        grouped = probe.nodeid == "probe@group"
    except AttributeError:
        grouped = False
    if not grouped:
        raise pytest.UsageError(f"pytest-xdist's --dist loadgroup does not work with pytest {pytest.__version__} (it "
                                "cannot tag a test's node id with its group): install the versions in constraints.txt "
                                "(pip install -c constraints.txt -e '.[dev]'), or run with -n 0")
