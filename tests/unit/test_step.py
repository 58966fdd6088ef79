"""The optimizer step on a stand-in engine: nothing read back from the device; what the forward casts."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch
from fixtures.numerics import full_logits_loss_sum

from ds_vlm.train.loss import LabelLoss


class _Model(torch.nn.Module):
    """A one-layer 'language model' with an LM head, as LabelLoss and StepRunner see a VLM."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.lm_head = torch.nn.Linear(8, 16, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.lm_head(self.embed(input_ids)))


class _Engine(torch.nn.Module):
    """Just what StepRunner calls on a DeepSpeed engine."""

    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.module = _Model()

    def forward(self, **batch):
        return self.module(**batch)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        self.module.zero_grad()

    zero_optimization_stage = staticmethod(lambda: 2)
    bfloat16_enabled = staticmethod(lambda: False)
    get_global_grad_norm = staticmethod(lambda: torch.tensor(1.0))
    was_step_applied = staticmethod(lambda: True)


def test_a_step_never_reads_a_value_back_from_the_device(monkeypatch, tmp_path):
    """No .item(), .tolist(), float()/int()/bool() of a tensor, .cpu() or .numpy() from ds_vlm's code while a
    step of 4 micro-batches runs: each would be a host sync per micro-batch on a GPU. Reading the step's
    numbers afterwards (when it is logged) is one .tolist()."""
    import torch.distributed as dist

    from ds_vlm.data.batching import MicroBatch
    from ds_vlm.train.forward import ForwardContext
    from ds_vlm.train.step import StepRunner

    calls = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "ds_vlm" in caller:
                calls.append((_name, caller, sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        engine = _Engine()
        runner = StepRunner(engine, 1, ForwardContext(LabelLoss(engine.module), engine.device, torch.float32))
        micro = MicroBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels, samples=2, tokens=10,
                           targets=5, computed=10, sample_lengths=[5, 5])
        pending = runner.start([micro] * 4)
        # one read in the whole step, after it: the all-reduced stop request and bad-record count (on a GPU a
        # pinned copy queued before the first backward, which DeepSpeed's own step has waited past)
        assert [(c[0], os.path.basename(c[1])) for c in calls] == [("tolist", "step.py")], calls
        calls.clear()
        # the next step carries this one's sums in its own label-count all-reduce: one collective a step
        reduces = []
        original_all_reduce = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: reduces.append(t.numel())
                            or original_all_reduce(t, *a, **k))
        following = runner.start([micro] * 2, carry=pending.totals)
        assert reduces == [3 + len(pending.totals)], reduces
        calls.clear()
        stats = pending.stats(following.carried)
        assert [c[0] for c in calls] == ["tolist", "__float__"], calls  # the step's sums, the grad norm
        assert reduces == [3 + 10]  # carried: no collective of its own (7 sums, 3 memory)
        last = following.stats()  # no step follows (the last one, or before a save): its own all-reduce
        assert reduces == [3 + 10, 10] and last.targets == 2 * 5
    finally:
        dist.destroy_process_group()
    assert stats.targets == 4 * 5 and stats.tokens == 40 and stats.grad_norm == 1.0
    logits = engine.module(ids).logits.detach()
    expected = full_logits_loss_sum(logits, labels) / 5  # the same batch 4 times: the mean of one
    assert stats.loss == pytest.approx(float(expected), rel=1e-6)


def test_only_the_pixels_take_the_model_dtype():
    """Qwen's second_per_grid_ts are times in seconds: bf16 would round 0.5 s steps of a long video."""
    from ds_vlm.train.forward import ForwardContext

    context = ForwardContext(None, torch.device("cpu"), torch.bfloat16)
    moved = context.to_device({"pixel_values": torch.ones(2, 3), "pixel_values_videos": torch.ones(2, 3),
                              "second_per_grid_ts": torch.tensor([1000.5]), "input_ids": torch.ones(1, 2).long()})
    assert moved["pixel_values"].dtype == moved["pixel_values_videos"].dtype == torch.bfloat16
    assert moved["second_per_grid_ts"].dtype == torch.float32 and moved["second_per_grid_ts"].item() == 1000.5


def test_the_watchdog_gives_long_phases_their_own_limit():
    """A checkpoint, an evaluation, an export or a conversion may legitimately last past --dist_timeout_s (rank 0
    writing a large model, generation without loader workers): those phases have --long_phase_timeout_s; the
    step's phases keep the short limit. (Clocks given, not waited for.)"""
    from ds_vlm.runtime.faults import LONG_PHASES, Watchdog

    dog = Watchdog(rank=0, world=1, timeout_s=810, long_timeout_s=7200, start=False)
    assert LONG_PHASES == {"checkpoint", "eval", "export", "convert"}
    for name in ("data", "forward", "backward", "step", "log"):
        assert dog.limit_s(name) == 810
        assert dog.overdue((name, 3, 0.0), 811) and not dog.overdue((name, 3, 0.0), 809)
    for name in LONG_PHASES:
        assert not dog.overdue((name, 3, 0.0), 3600) and dog.overdue((name, 3, 0.0), 7201)
    assert not dog.overdue(None, 10**9)
    assert Watchdog(0, 1, timeout_s=900, long_timeout_s=60, start=False).limit_s("export") == 900  # never shorter


class _MoeModel(_Model):
    """The stand-in with a router's auxiliary loss in its output, as transformers' MoE models return it."""

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        return SimpleNamespace(logits=self.lm_head(hidden), aux_loss=hidden.pow(2).mean() + 1.0)


def test_router_aux_loss_joins_the_loss_with_its_coefficient_and_is_logged(tmp_path):
    """Where the config asks for it, the objective a micro-batch backpropagates is its summed loss + coef x aux
    x its label rows: after the division by the step's label count, the mean loss + coef x aux (transformers'
    own `loss + router_aux_loss_coef * aux_loss`); the step logs the aux loss itself, and a step without it
    logs none."""
    import torch.distributed as dist

    from ds_vlm.data.batching import MicroBatch
    from ds_vlm.train.forward import ForwardContext
    from ds_vlm.train.step import StepRunner

    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    micro = MicroBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels, samples=2, tokens=10,
                       targets=5, computed=10, sample_lengths=[5, 5])
    coef = 0.25
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        results = {}
        for c in (0.0, coef):
            engine = _Engine()
            engine.module = _MoeModel()
            seen = []
            engine.backward = lambda loss, scale_wrt_gas=True, seen=seen: seen.append(loss.detach())
            runner = StepRunner(engine, 1, ForwardContext(LabelLoss(engine.module), engine.device, torch.float32,
                                                          router_aux_coef=c))
            stats = runner.start([micro]).stats()
            results[c] = seen[0], stats
    finally:
        dist.destroy_process_group()
    aux = float(_MoeModel()(ids).aux_loss)
    (plain, plain_stats), (with_aux, aux_stats) = results[0.0], results[coef]
    assert float(with_aux - plain) == pytest.approx(coef * aux, rel=1e-6)
    assert aux_stats.router_aux_loss == pytest.approx(aux, rel=1e-6) and plain_stats.router_aux_loss is None
    assert aux_stats.loss == pytest.approx(plain_stats.loss, rel=1e-7)  # the logged loss is the cross-entropy
