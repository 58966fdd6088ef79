"""Optimizer groups and the LR schedule."""

from __future__ import annotations

import pytest

from ds_vlm.train.optim import lr_lambda


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
    from ds_vlm.train.optim import param_groups

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


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(demo_dir):
    """The split DeepSpeed's Muon makes (its own rule, read through muon_flags) on the tiny Qwen3-VL: every
    attention, MLP and projector matrix to Muon; embeddings, the (tied) LM head, norms, biases and the vision
    patch embedding (a 5-d Conv3d) to AdamW. param_groups then keeps the two apart, Muon at --muon_lr."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import OptimConfig
    from ds_vlm.train.optim import muon_flags, param_groups

    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model")
    assert sum(muon_flags(model).values()) == 26  # of 63 tensors (22 of the 48 a --train_vision last:1 run trains)
    muon = {n for n, p in model.named_parameters() if p.use_muon}
    adam = {n for n, p in model.named_parameters() if not p.use_muon}
    assert all(p.dim() == 2 for n, p in model.named_parameters() if n in muon)
    assert any(".self_attn.q_proj." in n for n in muon) and any(".mlp.down_proj." in n for n in muon)
    assert any(n.startswith("model.visual.blocks.") and ".attn.qkv.weight" in n for n in muon)
    assert any(n.startswith("model.visual.merger.") for n in muon)
    assert {"model.language_model.embed_tokens.weight", "model.visual.patch_embed.proj.weight",
            "model.visual.pos_embed.weight"} <= adam
    assert all(p.dim() < 2 or "embed" in n or "lm_head" in n for n, p in model.named_parameters() if n in adam)
    names = {id(p): n for n, p in model.named_parameters()}
    parts = {"llm": list(model.named_parameters())}
    groups = param_groups(parts, OptimConfig(lr=1e-4, muon_lr=0.02), muon=True)
    assert [(g["name"], g["lr"]) for g in groups] == [("llm", 1e-4), ("llm", 0.02)]
    assert {names[id(p)] for p in groups[1]["params"]} == muon
    assert [g["lr"] for g in param_groups(parts, OptimConfig(lr=1e-4), muon=False)] == [1e-4]
