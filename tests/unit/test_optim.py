"""Optimizer groups and the LR schedule."""

from __future__ import annotations

import pytest

from ds_vlm.optim import lr_lambda


def test_warmup_then_cosine():
    f = lr_lambda(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(99) == pytest.approx(0.1, abs=1e-3)
    assert all(f(s) >= f(s + 1) for s in range(10, 99))


def test_groups_by_learning_rate_and_weight_decay():
    """Parts with the same lr share a group; 1-d tensors and norms get no decay in a group of their own only
    where there is a decay to leave out (each group costs ZeRO its own flat buffer and all-gather)."""
    import torch

    from ds_vlm.config import OptimConfig
    from ds_vlm.optim import param_groups

    def named(*shapes):
        return [(f"layers.{i}.{'norm' if len(s) == 1 else 'proj'}.weight", torch.nn.Parameter(torch.zeros(*s)))
                for i, s in enumerate(shapes)]

    frozen = named((2, 2))
    frozen[0][1].requires_grad_(False)
    parts = {"vision": frozen, "projector": named((4, 2), (4,)), "llm": named((3, 3), (3,), (3, 3))}
    plain = param_groups(parts, OptimConfig(lr=1e-4, weight_decay=0.0))
    assert [(g["name"], len(g["params"]), g["weight_decay"]) for g in plain] == [("projector+llm", 5, 0.0)]
    decayed = param_groups(parts, OptimConfig(lr=1e-4, weight_decay=0.1, projector_lr=1e-3))
    assert [(g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in decayed] == [
        ("projector", 1, 1e-3, 0.1), ("projector_no_decay", 1, 1e-3, 0.0), ("llm", 2, 1e-4, 0.1),
        ("llm_no_decay", 1, 1e-4, 0.0)]
