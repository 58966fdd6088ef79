"""`ds-vlm check-model`: a real-size config shrunk to a tiny one that still builds and keeps its structure; the
checks' table and JSON (the 2-rank runs stood in for: the family tests run them for real); the per-type survey."""

from __future__ import annotations

import json
import shutil

import torch

import ds_vlm.models.check as check_model
from ds_vlm.models.check_tiny import shrink


def _meta(config):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def test_shrink_keeps_structure_and_builds():
    from transformers import Gemma3Config

    from ds_vlm.demo import QWEN_SPECIAL_TOKENS
    from ds_vlm.testing.real import qwen3_vl_2b_config

    qwen = qwen3_vl_2b_config({t: i for i, t in enumerate(QWEN_SPECIAL_TOKENS)})
    changed = shrink(qwen)
    text, vision = qwen.text_config, qwen.vision_config
    assert "text.num_hidden_layers: 28 -> 2" in changed and text.hidden_size == vision.out_hidden_size == 64
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert all(i < vision.depth for i in vision.deepstack_visual_indexes)
    assert sum(p.numel() for p in _meta(qwen).parameters()) < 30e6  # the 151k-token vocabulary dominates
    gemma = Gemma3Config()
    shrink(gemma)
    assert gemma.text_config.layer_types == ["sliding_attention", "full_attention"]  # both kinds kept
    _meta(gemma)
    assert shrink(gemma) == []  # never grows, and a tiny config stays as it is
    from transformers import Glm46VConfig  # its 3-d rope turns half of each head: the sections fit that half

    glm = Glm46VConfig(text_config={"rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12],
                                                         "partial_rotary_factor": 0.5}, "head_dim": 128})
    shrink(glm)
    assert sum(glm.text_config.rope_parameters["mrope_section"]) == glm.text_config.head_dim // 4
    _meta(glm)


def _fake_train(ranks, flags, out, timeout=600, resume="none", nudge=0.0):
    """Stands in for launch/train.py: the model as its export, 3 losses (a fresh run) or step 3's (a resumed one);
    `nudge` moves one exported weight (a resume that is not exact)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(flags[flags.index("--model") + 1], out / "hf", dirs_exist_ok=True)
    if nudge:
        path = out / "hf" / "model.safetensors"
        tensors = load_file(path)
        name = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[name] = tensors[name] + nudge
        save_file(tensors, path)
    return [1.2] if resume == "auto" else [2.0, 1.5, 1.2]


def test_check_model_resume_fails_where_the_resumed_run_ends_elsewhere(family_models, tmp_path, monkeypatch):
    """The resume check compares step 3's loss and every exported tensor with the uninterrupted run's."""
    import functools

    checker = check_model.Checker(str(family_models("llava")), tmp_path)
    checker.run("load", checker.load)
    for nudge, status in ((0.0, "ok"), (1e-4, "failed")):
        monkeypatch.setattr(check_model, "train", _fake_train)
        checker.run("train_zero3", checker.train_zero3, ("load",))
        monkeypatch.setattr(check_model, "train", functools.partial(_fake_train, nudge=nudge))
        checker.run("resume", checker.resume, ("train_zero3",))
        assert checker.checks[-1].status == status, checker.checks[-1]
    assert "differs from the uninterrupted one" in checker.checks[-1].detail


def test_check_model_table_and_json(family_models, tmp_path, monkeypatch, capsys):
    """Gemma 3: packing and sequence parallelism refused with their reasons, the other checks ok; check.json as
    documented."""

    monkeypatch.setattr(check_model, "train", _fake_train)
    out = tmp_path / "check.json"
    rc = check_model.main(["--model", str(family_models("gemma3")), "--out", str(out), "--work", str(tmp_path / "w")])
    report = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert rc == 0 and report["model_type"] == "gemma3", capsys.readouterr().out
    assert status == {"load": "ok", "train_zero3": "ok", "resume": "ok", "packed_vs_padded": "refused",
                      "sequence_parallel": "refused", "lora": "ok", "export_generate": "ok", "plan": "ok"}, report
    assert all(set(c) == {"name", "status", "seconds", "detail"} for c in report["checks"])
    refused = next(c for c in report["checks"] if c["name"] == "packed_vs_padded")
    assert "sliding-window" in refused["detail"] and "token_type_ids" in refused["detail"]
    assert "packed_vs_padded   refused" in capsys.readouterr().out


def test_check_model_packs_exactly_where_allowed(family_models, tmp_path, monkeypatch):
    """LLaVA (plain causal Llama): packed equals padded, checked for real."""
    monkeypatch.setattr(check_model, "train", lambda *a, **k: (_ for _ in ()).throw(check_model.Refused("not run")))
    checker = check_model.Checker(str(family_models("llava")), tmp_path)
    checker.run("load", checker.load)
    checker.run("packed_vs_padded", checker.packed_vs_padded, ("load",))
    assert [c.status for c in checker.checks] == ["ok", "ok"], checker.checks


def test_survey_of_types_names_adapters_and_refusals():
    from ds_vlm.models.check_types import check_type

    assert check_type("gemma3")["adapter"] == "Gemma3Adapter"
    assert check_type("gemma3")["packing"].startswith("refused: gemma3: image tokens attend both ways")
    blip = check_type("blip-2")
    assert blip["adapter"] == "GenericAdapter" and "no `model.model`" in blip["parts"]
    llava_onevision = check_type("llava_onevision")  # image_newline, a parameter of model.model, in the projector
    assert llava_onevision["parts"].startswith("ok") and llava_onevision["packing"].startswith("allowed")
