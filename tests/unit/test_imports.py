"""Who may import whom: the installed package (ds_vlm/) imports nothing from the tools beside it (benchmarks/) nor
from the suite (tests/), and the tools' modules import each other without a circle. Read from the source (every
import statement, those inside functions too), so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ("benchmarks", "tests", "fixtures", "conftest")  # what pytest puts on the path: tests/ and tests/fixtures


def imported_modules(path: Path) -> set[str]:
    """The absolute module names `path` imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from benchmarks import x`
    return names


def test_the_package_imports_nothing_from_benchmarks_or_tests():
    found = {f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "ds_vlm").rglob("*.py"))
             for name in imported_modules(path) if name.split(".")[0] in OUTSIDE}
    assert not found, sorted(found)


def test_the_tools_import_each_other_without_a_circle():
    modules = {f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}
    assert graph["benchmarks.gpu_check"] == {"benchmarks.gpu_common", "benchmarks.gpu_stages"}  # the scan sees them
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name not in done:
            for imported in sorted(graph[name]):
                visit(imported, (*path, name))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())
