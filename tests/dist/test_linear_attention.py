"""Sequence parallelism over Qwen3.5's hybrid tower: 2 CPU ranks equal one (tests/scripts/linear_attention_sp.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, free_port, start_zygote, train_env


def test_sequence_parallel_2_equals_one_rank(tmp_path):
    """Tiny hybrid Qwen3.5 and Qwen3.5-MoE language models (Gated DeltaNet, full attention, Gated DeltaNet)
    under --sequence_parallel 2: the full-attention layer through Ulysses, the Gated DeltaNet layers through
    their own all-to-alls (each rank the whole sequence for half the heads and their conv channels). A packed
    row of two samples (one past the delta rule's 64-token chunk) and a batch of two unpacked rows give the loss
    and every gradient of one rank: in float64 (transformers' delta rule and norms compute in float32 inside)
    every gradient within 1e-6 of its scale (not the MoE tower: no float64 experts); in float32 within 1e-5,
    but 1e-3 for the last Gated DeltaNet layer's decay parameters (A_log, dt_bias, in_proj_a), whose gradients
    are sums that cancel."""
    out = tmp_path / "report.json"
    start_zygote()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "ranks.py"), "2", str(free_port()),
                           str(ROOT / "tests" / "scripts" / "linear_attention_sp.py"), str(out)],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert len(report) == 6
    for case, result in report.items():
        assert not result["missing"], case
        float64 = "float64" in case
        assert result["loss"] < (1e-9 if float64 else 1e-6), case
        for name, difference in result["grads"].items():
            decay = any(k in name for k in ("A_log", "dt_bias", "in_proj_a"))
            assert difference < (1e-6 if float64 else 1e-3 if decay else 1e-5), (case, name, difference)
