"""ds_vlm/patches/: every runtime change to torch, transformers or DeepSpeed is a named, documented patch, and
none is made anywhere else in the package (issue 32's done-when line)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ds_vlm"
HOME = PACKAGE / "patches"

# What changes a foreign object's behaviour, as it is written in source.
FORBIDDEN = {
    "a forward assigned": re.compile(r"\.forward\s*=(?!=)"),
    "a class swapped": re.compile(r"\.__class__\s*=(?!=)"),
    "mock.patch": re.compile(r"\bmock\.patch|\bunittest\.mock\b|from unittest import mock"),
    "a forward hook": re.compile(r"register_forward_(pre_)?hook|register_module_forward_(pre_)?hook"),
    "a backward hook": re.compile(r"register_(full_)?backward_(pre_)?hook"),
    "transformers' private registry": re.compile(r"_global_mapping"),
    "transformers' private ZeRO-3 switch": re.compile(r"_hf_deepspeed_config_weak_ref"),
}

# Hooks that measure and change nothing may stay where they are, named here file by file.
MEASURING = {
    # the planner's LiveBytes: forward pre-hooks and hooks that label which module made each storage
    "memplan/live_bytes.py": {"a forward hook"},
}


def test_every_patch_is_named_and_documented():
    from ds_vlm.patches import Patch, registered

    patches = registered()
    assert len(patches) >= 10
    names = [p.name for p in patches]
    assert len(names) == len(set(names))
    for p in patches:
        assert isinstance(p, Patch)
        assert re.fullmatch(r"[a-z0-9_]+", p.name), p.name
        assert any(lib in p.library for lib in ("torch", "transformers", "deepspeed")), p
        assert re.search(r"(torch|transformers|deepspeed) \d+\.\d+", p.versions), f"{p.name}: versions {p.versions!r}"
        for field in ("target", "reason", "scope"):
            assert len(getattr(p, field)) > 30, f"{p.name}: say more in {field}"


def test_every_module_of_the_home_declares_its_patches():
    import importlib

    from ds_vlm.patches import Patch

    for path in sorted(HOME.glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"ds_vlm.patches.{path.stem}")
        assert any(isinstance(v, Patch) for v in vars(module).values()), f"{path.name} declares no Patch"


def test_the_patches_named_in_the_source_exist():
    """A patch named in backquotes where it is used (`the patch `name``) is one the registry has."""
    from ds_vlm.patches import registered

    names = {p.name for p in registered()}
    cited = set()
    for path in PACKAGE.rglob("*.py"):
        cited |= set(re.findall(r"patch(?:es)? `([a-z0-9_]+)`", path.read_text()))
    assert cited and cited <= names, cited - names


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_no_runtime_change_outside_the_home(what):
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if HOME in path.parents:
            continue
        relative = path.relative_to(PACKAGE).as_posix()
        if what in MEASURING.get(relative, ()):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN[what].search(line.split("#", 1)[0]):
                found.append(f"ds_vlm/{relative}:{number}: {line.strip()}")
    assert not found, f"{what} outside ds_vlm/patches/ (declare it there as a Patch):\n" + "\n".join(found)


def test_the_lm_head_is_patched_only_while_armed():
    import torch

    from ds_vlm.train.loss import LabelLoss, LabelRows

    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(4, 7)
    model.get_output_embeddings = lambda: model.lm_head
    loss = LabelLoss(model)
    assert "forward" not in vars(model.lm_head)
    hidden = torch.randn(1, 3, 4)
    rows = LabelRows(torch.tensor([0, 2]), torch.tensor([1, 5]))
    with loss.armed(rows) as head:
        assert "forward" in vars(model.lm_head)
        summed = model.lm_head(hidden)
        assert head.computed and summed.dim() == 0
        assert model.lm_head(hidden).shape == (1, 3, 7)  # a second call: logits
    assert "forward" not in vars(model.lm_head)
    expected = torch.nn.functional.cross_entropy(model.lm_head(hidden)[0, [0, 2]], rows.targets, reduction="sum")
    torch.testing.assert_close(summed, expected)
