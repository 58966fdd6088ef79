"""The suite's collection hook (the `dist` and xdist-group marks). Its fixtures and helpers live in modules of
their own under tests/fixtures/ (runs, datasets, encoding, numerics); tests import the helpers from there."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

pytest_plugins = ["fixtures.runs", "fixtures.datasets", "fixtures.encoding", "fixtures.launching"]


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marker
def pytest_collection_modifyitems(config, items):
    """Every test under tests/dist/ launches real multi-process runs: marked `dist` (`-m "not dist"` is the fast,
    in-process tier under tests/unit/). Under pytest-xdist (`-n 2 --dist loadgroup`, pyproject's addopts) the
    multi-rank tests that compute run one after another on one worker (xdist group `ranks`: two of them at once
    would share two cores and both slow down), while the other worker runs the in-process tier and the tests
    marked `waits` (most of their time is spent waiting on a timeout, a stopped rank or a node that never
    comes)."""
    for item in items:
        if "dist" in Path(str(item.fspath)).relative_to(TESTS).parts[:1]:
            item.add_marker(pytest.mark.dist)
            if item.get_closest_marker("waits") is None:
                item.add_marker(pytest.mark.xdist_group("ranks"))


def pytest_configure(config):
    """Under `--dist loadgroup` (pyproject's addopts), xdist groups a test by appending `@group` to its node id
    (`item._nodeid`); pytest 9.2 computes node ids otherwise and the groups are lost without a word: the multi-rank
    tests then run two at a time on two cores, and a family's module fixture runs once per worker. constraints.txt
    pins pytest 9.1.1; a pytest where xdist's way does not hold stops the run here, saying so."""
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
