"""Expert parallelism (DeepSpeed AutoEP) on 2 CPU ranks, for both MoE families (qwen3_vl_moe, qwen3_5_moe): the
tiny model trained with its experts split over the 2 ranks gives the losses and the router's aux loss of the run
that keeps them whole (EP 1), images included; its HF export holds the experts gathered whole in the transformers
layout (the EP 1 run's tensors, and from_pretrained reads it), under ZeRO-2 and (qwen3_5_moe) ZeRO-3.
Qwen3-VL-MoE's step-2 checkpoint of EP 2 resumes at EP 1 (the universal format; AutoEP kept at size 1) with the
uninterrupted losses, and that run's step-3 checkpoint resumes at EP 2 likewise (and at EP 1, as EP 2's at EP 2,
without conversion)."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures.runs import ROOT, read_metrics, run_train

FAMILIES = ("qwen3_vl_moe", "qwen3_5_moe")


def _run(model, out, ep: int, data, *extra, zero: int = 2):
    return run_train(["--model", str(model), "--train_data", str(data),
                      "--deepspeed", str(ROOT / "ds_configs" / f"zero{zero}.json"), "--output_dir", str(out),
                      "--max_steps", "4", "--save_steps", "2", "--micro_batch_size", "1", "--lr", "1e-3",
                      "--warmup_ratio", "0", "--num_workers", "0", "--dist_timeout_s", "120",
                      "--expert_parallel", str(ep), *extra])


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]


def _steps(out) -> dict:
    return {r["step"]: (r["loss"], r["router_aux_loss"]) for r in read_metrics(out)}


def _tensors(folder) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def _resume_from(source, step: int, out):
    name = f"step_{step:08d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / name, out / "checkpoints" / name,
                    ignore=shutil.ignore_patterns("universal*"))
    (out / "checkpoints" / "latest").write_text(name)


@pytest.fixture(scope="module")
def ep_runs(family_models, tmp_path_factory):
    """family -> {ep: output dir} of the runs at EP 1 and EP 2 under ZeRO-2 (the router's aux loss on, HF export
    on); qwen3_5_moe's "zero3": EP 2 under ZeRO-3."""
    runs = {}
    for family in FAMILIES:
        model = family_models(family)
        data = model.parent / "data" / "train.jsonl"
        root = tmp_path_factory.mktemp(f"ep_{family}")
        runs[family] = {"model": model, "data": data}
        for ep in (1, 2):
            _ok(_run(model, root / f"ep{ep}", ep, data))
            runs[family][ep] = root / f"ep{ep}"
    zero3 = tmp_path_factory.mktemp("ep_zero3") / "ep2"
    _ok(_run(runs["qwen3_5_moe"]["model"], zero3, 2, runs["qwen3_5_moe"]["data"], zero=3))
    runs["qwen3_5_moe"]["zero3"] = zero3
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_parallel_2_equals_1_with_aux_loss_and_export(ep_runs, family):
    import torch
    from transformers import AutoModelForImageTextToText

    runs = ep_runs[family]
    section = json.loads((runs[2] / "run_config.json").read_text())["ds_config"]["expert_parallel"]
    assert section["autoep_size"] == 2 and section["preset_model"] == "qwen3_moe" and section["top_k"] == 2
    one, two = _steps(runs[1]), _steps(runs[2])
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:  # the loss and the router's load-balancing loss, logged
        assert two[step] == pytest.approx(one[step], abs=1e-5), (step, one, two)
        assert one[step][1] > 0

    whole, gathered = _tensors(runs[1] / "hf"), _tensors(runs[2] / "hf")
    assert sorted(gathered) == sorted(whole)
    experts = [k for k in whole if k.endswith("mlp.experts.gate_up_proj")]
    assert experts and all(gathered[k].shape == whole[k].shape for k in experts)
    for key, value in whole.items():  # 4 Adam steps at lr 1e-3 carry the losses' fp32 rounding to ~3e-5
        assert torch.allclose(gathered[key], value, atol=1e-4), key
    reloaded = AutoModelForImageTextToText.from_pretrained(runs[2] / "hf")
    assert torch.equal(reloaded.state_dict()[experts[0]], gathered[experts[0]])
    if "zero3" in runs:  # ZeRO-3 partitions the experts again over their expert-data-parallel group
        three = _steps(runs["zero3"])
        assert sorted(three) == [1, 2, 3, 4] and all(three[s] == pytest.approx(one[s], abs=1e-5) for s in one)
        zero3 = _tensors(runs["zero3"] / "hf")
        assert sorted(zero3) == sorted(whole)
        for key, value in whole.items():
            assert torch.allclose(zero3[key], value, atol=1e-4), key


def test_expert_parallel_resumes_across_sizes(ep_runs, tmp_path):
    runs = ep_runs["qwen3_vl_moe"]
    model, data, uninterrupted = runs["model"], runs["data"], _steps(runs[2])
    to_one = tmp_path / "to_one"  # EP 2's step 2 at EP 1: universal format, AutoEP's layout kept at size 1
    _resume_from(runs[2], 2, to_one)
    _ok(_run(model, to_one, 1, data, "--save_steps", "1", "--export_hf", "false"))
    got = _steps(to_one)
    assert sorted(got) == [3, 4] and all(got[s] == pytest.approx(uninterrupted[s], abs=1e-5) for s in got), got
    section = json.loads((to_one / "run_config.json").read_text())["ds_config"]["expert_parallel"]
    assert section["autoep_size"] == 1
    for ep, source, step in ((2, to_one, 3),  # that run's step 3 (EP 1, AutoEP's layout) at EP 2
                             (1, to_one, 3),  # ... and at EP 1: no conversion, AutoEP's layout kept
                             (2, runs[2], 2)):  # EP 2's step 2 at EP 2: no conversion
        out = tmp_path / f"ep{ep}_from_{source.name}"
        _resume_from(source, step, out)
        _ok(_run(model, out, ep, data, "--export_hf", "false"))
        got = _steps(out)
        assert sorted(got) == list(range(step + 1, 5)), got
        assert all(got[s] == pytest.approx(uninterrupted[s], abs=1e-5) for s in got), (ep, source, got)
        assert (out / "checkpoints" / f"step_{step:08d}" / "universal").is_dir() == (ep != (1 if source == to_one
                                                                                          else 2))
