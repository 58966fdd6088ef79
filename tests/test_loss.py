"""The loss on label rows only, in chunks: equal to the full-logits loss (value and every gradient) for each
family, on 2 ranks under ZeRO-2/3 with tied and untied heads, within its memory bound at Qwen's vocabulary,
and a step that never asks the device for a value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ROOT,
    full_logits_loss_sum,
    read_metrics,
    run_train,
    train_command,
    train_env,
)

from ds_vlm.data.batching import Collator, SFTDataset
from ds_vlm.data.encode import Encoder
from ds_vlm.data.sources import RecordIndex
from ds_vlm.demo import FAMILIES
from ds_vlm.loss import LabelLoss, LabelRows
from ds_vlm.models import adapter_for


def _batch(model_dir: Path, data: Path, indices: list[int]):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    family = json.loads((model_dir / "config.json").read_text())["model_type"]
    encoder = Encoder(processor, adapter_for(family), 4096)
    dataset = SFTDataset(RecordIndex([str(data)]), encoder)
    batch, _ = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())([dataset[i] for i in indices])
    return batch


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_full_logits_loss(family, family_models, mixed_data, monkeypatch):
    """Value and every parameter's gradient, fp32, several chunks; an image sample and a text-only one."""
    from transformers import AutoModelForImageTextToText

    import ds_vlm.loss

    model_dir = family_models(family)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    batch = _batch(model_dir, mixed_data, [0, 1, 2])  # records 1 is text-only
    labels = batch.pop("labels")
    rows = LabelRows.from_labels(labels)
    assert len(rows) > 10

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = loss_and_grads(lambda: full_logits_loss_sum(model(**batch).logits, labels))
    monkeypatch.setattr(ds_vlm.loss, "CHUNK_BYTES", 4 * model.config.get_text_config().vocab_size * 3)  # 3 rows
    chunked = loss_and_grads(lambda: LabelLoss(model, "chunked")(model, batch, rows))
    torch.testing.assert_close(chunked[0], reference[0], rtol=1e-5, atol=0)
    assert chunked[1].keys() == reference[1].keys() and len(reference[1]) > 10
    # relative to each gradient's largest entry; a gradient that is zero in exact arithmetic (a key bias under
    # softmax) holds fp32 noise only, so no scale below 1e-3 of the model's largest gradient entry is used
    largest = max(float(g.abs().max()) for g in reference[1].values())
    for name, grad in reference[1].items():
        scale = max(float(grad.abs().max()), 1e-3 * largest)
        torch.testing.assert_close(chunked[1][name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    head = model.get_output_embeddings().weight
    assert (head is model.get_input_embeddings().weight) == (family != "llava")  # tied and untied both seen
    # unarmed, the head is the plain head again: logits over every position, as generation needs
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.dist
def test_two_ranks_zero2_zero3_tied_and_untied(demo_dir, mixed_data, tmp_path):
    """One launch of 2 CPU ranks: for ZeRO-2 and ZeRO-3 (every parameter partitioned), with the demo's tied
    head and an untied copy, the chunked loss and the full-logits loss give the same global loss and the
    same full gradient of every parameter (each rank holding different samples, one of them text-only)."""
    from ds_vlm.demo import build_model_dir

    untied = build_model_dir(tmp_path / "untied", tie_embeddings=False)
    out = tmp_path / "parity.json"
    script = ROOT / "tests" / "scripts" / "loss_parity.py"
    command = train_command([], 2)
    command[command.index(str(ROOT / "launch" / "train.py"))] = str(script)
    command += ["--models", f"{demo_dir / 'model'},{untied}", "--data", str(mixed_data), "--out", str(out)]
    env = train_env({"PYTHONPATH": str(ROOT / "tests")})  # the script imports the reference loss from conftest
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(out.read_text())
    assert {(r["stage"], r["tied"]) for r in results} == {(2, True), (2, False), (3, True), (3, False)}
    for r in results:
        assert r["loss_chunked"] == pytest.approx(r["loss_full"], rel=1e-5), r
        assert r["n_grads"] > 10 and r["same_names"] and r["max_rel_grad_diff"] <= 1e-5, r
        assert r["head_grad_norm"] > 0, r


@pytest.mark.dist
def test_peak_memory_at_qwen_vocabulary(tmp_path):
    """2 ranks, ZeRO-3, a tiny Qwen3-VL with the real 151,936-token vocabulary, ~1.8k-token samples (1,600
    image tokens and a long question) with short answers: the full-logits loss peaked at 5.5 GB per rank (RSS,
    ~0.9 GB of it imports); this one must stay under 2."""
    import random

    from ds_vlm.demo import build_model_dir, caption, draw_shape

    model = build_model_dir(tmp_path / "model", vocab_size=151_936)
    rng = random.Random(0)
    records = []
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                        ("yellow", "circle")]):
        draw_shape(color, shape, rng, size=640).save(tmp_path / f"{i}.png")
        records.append({"conversations": [{"from": "human", "value": "<image>" + "What is in this picture? " * 24},
                                          {"from": "gpt", "value": caption(color, shape)}], "images": [f"{i}.png"]})
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    proc = run_train(["--model", str(model), "--train_data", str(data), "--deepspeed",
                      str(ROOT / "ds_configs" / "zero3.json"), "--output_dir", str(out), "--max_steps", "2",
                      "--max_pixels", str(640 * 640), "--min_pixels", str(640 * 640), "--max_length", "2048",
                      "--num_workers", "0", "--export_hf", "false", "--dist_timeout_s", "120"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = read_metrics(out)
    assert len(rows) == 2
    assert rows[0]["tokens"] / 2 > 1750  # 1 sample per rank; the image alone is 1,600 tokens
    assert max(max(r["peak_mem_gb"]) for r in rows) <= 2.0, [r["peak_mem_gb"] for r in rows]


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

    from ds_vlm.step import StepRunner

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
    meta = {"targets": 5, "tokens": 10, "samples": 2, "computed": 10, "sample_lengths": [5, 5]}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        engine = _Engine()
        runner = StepRunner(engine, 1, torch.float32, LabelLoss(engine.module))
        pending = runner.start([({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                                 dict(meta)) for _ in range(4)])
        # one read in the whole step, after it: the all-reduced stop request and bad-record count (on a GPU a
        # pinned copy queued before the first backward, which DeepSpeed's own step has waited past)
        assert [(c[0], os.path.basename(c[1])) for c in calls] == [("tolist", "step.py")], calls
        calls.clear()
        stats = pending.result()
        assert [c[0] for c in calls] == ["tolist", "__float__"], calls  # the step's sums, the grad norm
    finally:
        dist.destroy_process_group()
    assert stats["targets"] == 4 * 5 and stats["tokens"] == 40 and stats["grad_norm"] == 1.0
    logits = engine.module(ids).logits.detach()
    expected = full_logits_loss_sum(logits, labels) / 5  # the same batch 4 times: the mean of one
    assert stats["loss"] == pytest.approx(float(expected), rel=1e-6)
