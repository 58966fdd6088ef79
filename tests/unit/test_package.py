"""What importing ds_vlm decides (ds_vlm/patches/environment.py): the folder DeepSpeed builds its ops in."""

from __future__ import annotations

import sys
from pathlib import Path


def test_the_op_build_folder_falls_back_to_a_per_user_one_when_the_environment_is_read_only(monkeypatch, tmp_path):
    from ds_vlm.patches import environment

    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert environment.extensions_dir() == str(tmp_path / "venv" / "torch_extensions")
    monkeypatch.setattr(environment.os, "access", lambda path, mode: False)  # a read-only shared install
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    chosen = Path(environment.extensions_dir())
    assert chosen.parent == tmp_path / "home" / ".cache" / "ds_vlm" / "torch_extensions"
    assert chosen.name.startswith("venv-")
