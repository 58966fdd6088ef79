"""Every family on 2 ranks under ZeRO-3: trains on mixed batches, frozen parts stay, the export reloads and generates,
every group holds its learning rate, and a run resumed from the step-4 checkpoint ends where the uninterrupted one
did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures.datasets import write_json
from fixtures.runs import ROOT, crashed_copy, read_metrics, run_train

from ds_vlm.config import TrainConfig, key_table
from ds_vlm.data.images import load_images
from ds_vlm.data.plan import BatchPlan
from ds_vlm.data.sources import RecordIndex
from ds_vlm.data.templates import template_message
from ds_vlm.demo import FAMILIES
from ds_vlm.models import ADAPTERS, GENERIC_VERIFIED, adapter_for
from ds_vlm.models.loading import set_trainable
from ds_vlm.train.optim import param_groups

STEPS, MICRO, LR = 5, 2, 2e-3


RUNS = {
    "qwen3_vl": (["--train_vision", "last:1", "--vision_lr", "1e-3", "--projector_lr", "4e-3"],
                 {"vision": 1e-3, "projector": 4e-3, "llm": LR}),
    "qwen3_vl_moe": (["--weight_decay", "0.01"], {"projector": LR, "llm": LR}),  # vision frozen (default)
    "qwen2_5_vl": (["--train_vision", "all", "--vision_checkpointing", "--vision_lr", "1e-3"],
                   {"vision": 1e-3, "projector": LR, "llm": LR}),
    "qwen2_vl": (["--train_llm", "false", "--train_vision", "last:1", "--projector_lr", "5e-3"],
                 {"vision": LR, "projector": 5e-3}),
    "llava": (["--train_projector", "false", "--train_vision", "last:1", "--vision_lr", "3e-3"],
              {"vision": 3e-3, "llm": LR}),
    # the vision tower trained, the hybrid tower's both layer kinds checkpointed (the default)
    "qwen3_5": (["--train_vision", "all", "--vision_lr", "1e-3"], {"vision": 1e-3, "projector": LR, "llm": LR}),
    # vision frozen; the tiny config asks for the router's aux loss (logged, and in the loss)
    "qwen3_5_moe": (["--projector_lr", "4e-3"], {"projector": 4e-3, "llm": LR}),
    "gemma3": (["--train_vision", "last:1", "--vision_checkpointing", "--vision_lr", "1e-3"],
               {"vision": 1e-3, "projector": LR, "llm": LR}),
    "llava_onevision": (["--packing", "--projector_lr", "4e-3"], {"projector": 4e-3, "llm": LR}),  # generic adapter
    "mistral3": (["--train_vision", "all", "--vision_lr", "1e-3", "--train_projector", "false"],  # generic adapter
                 {"vision": 1e-3, "llm": LR}),
    "internvl": (["--packing", "--train_vision", "last:1"], {"vision": LR, "projector": LR, "llm": LR}),  # generic
    "smolvlm": (["--packing", "--train_vision", "last:1", "--vision_lr", "1e-3"],
                {"vision": 1e-3, "projector": LR, "llm": LR}),
    # SmolVLM's adapter, Idefics3's own template (typed parts only); the vision tower frozen
    "idefics3": (["--packing", "--projector_lr", "4e-3"], {"projector": 4e-3, "llm": LR}),
    # host-side 3-d rope per sample (GLM's own index function) under packing; the vision tower frozen
    "glm46v": (["--packing", "--projector_lr", "4e-3"], {"projector": 4e-3, "llm": LR}),
    # padded (packing refused: bidirectional image spans, sliding window); the last vision block trained
    "gemma4": (["--train_vision", "last:1", "--vision_lr", "1e-3"], {"vision": 1e-3, "projector": LR, "llm": LR}),
}
assert set(RUNS) == set(FAMILIES) == {a.family for a in ADAPTERS} | set(GENERIC_VERIFIED)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, family_models) -> Path:
    return family_models(request.param)


@pytest.fixture(scope="module")
def zero3_all_partitioned(tmp_path_factory) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return write_json(tmp_path_factory.mktemp("ds") / "zero3_all_partitioned.json", ds)


@pytest.fixture(scope="module")
def family_run(family_model, mixed_data, zero3_all_partitioned, tmp_path_factory):
    family = json.loads((family_model / "config.json").read_text())["model_type"]
    out = tmp_path_factory.mktemp(f"run_{family}") / "run"
    args = ["--model", str(family_model), "--train_data", str(mixed_data), "--deepspeed", str(zero3_all_partitioned),
            "--max_steps", str(STEPS), "--micro_batch_size", str(MICRO), "--lr", str(LR), "--warmup_ratio", "0",
            "--save_steps", str(STEPS - 1), "--num_workers", "0", "--dist_timeout_s", "120", *RUNS[family][0]]
    proc = run_train([*args, "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return family, family_model, out, args


@pytest.fixture(scope="module")
def family_resumed(family_run):
    """The run again from its step-4 checkpoint, as after a crash during the last step: it trains step 5 and
    exports."""
    _, _, out, args = family_run
    resumed = crashed_copy(out, out.parent / "resumed", STEPS - 1)
    proc = run_train([*args, "--output_dir", str(resumed)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"at step {STEPS - 1}" in proc.stderr, proc.stderr[-3000:]
    return resumed


def _load(path: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), AutoProcessor.from_pretrained(path)


def _run_config(out: Path) -> TrainConfig:
    """The run's config as the run recorded it (keys this process does not know are left out)."""
    known = set(key_table())
    recorded = json.loads((out / "run_config.json").read_text())["config"]
    return TrainConfig.from_keys(**{k: v for k, v in recorded.items() if k in known})


def _mixed_steps(data: Path) -> int:
    """Steps in which one rank's micro-batch has an image and the other's has none."""
    records = RecordIndex([str(data)])
    has_image = [bool(records.sample(i).images) for i in range(len(records))]
    plan = BatchPlan(len(records), MICRO, 1, 2, seed=42)
    return sum(len({any(has_image[i] for i in plan.micro_batches(s, r)[0]) for r in range(2)}) == 2
               for s in range(STEPS))


def test_family_trains_on_zero3_with_mixed_batches(family_run, mixed_data):
    from transformers import AutoConfig

    family, _, out, _ = family_run
    assert _mixed_steps(mixed_data) > 0
    losses = [r["loss"] for r in read_metrics(out)]
    drop = 0.05 if "--train_llm" in RUNS[family][0] else 0.3  # a frozen LLM learns only through the image
    assert len(losses) == STEPS and losses[-1] < losses[0] - drop, (family, losses)
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == family
    aux = [r.get("router_aux_loss") for r in read_metrics(out)]
    if adapter_for(family).router_aux_loss_coef(AutoConfig.from_pretrained(out / "hf")):  # the MoE families
        assert all(a is not None and a > 0 for a in aux), aux
    else:
        assert aux == [None] * STEPS


def test_frozen_parts_bit_identical_trained_parts_changed_export_generates(family_run, demo_dir):
    from ds_vlm.eval.generation import generate_answers

    family, model_dir, out, _ = family_run
    before, _ = _load(model_dir)
    config = _run_config(out)
    set_trainable(before, adapter_for(family), config.model)
    after, processor = _load(out / "hf")
    trained = dict(after.named_parameters())
    assert trained.keys() == dict(before.named_parameters()).keys()
    frozen = [n for n, p in before.named_parameters() if not p.requires_grad]
    changed = [n for n, p in before.named_parameters() if not torch.equal(p, trained[n])]
    assert not set(frozen) & set(changed), (family, sorted(set(frozen) & set(changed))[:5])
    assert frozen or family in ("qwen2_5_vl", "qwen3_5"), family  # the runs that train every part
    assert set(changed) == {n for n, p in before.named_parameters() if p.requires_grad}, family

    image_sample = RecordIndex([str(demo_dir / "data" / "test.jsonl")]).sample(0)
    text_sample = RecordIndex([str(demo_dir / "data" / "mixed.jsonl")]).sample(1)
    answers = generate_answers(after.eval(), processor, [image_sample, text_sample], max_new_tokens=4)
    prompt = processor.apply_chat_template([template_message(image_sample.messages[0])], tokenize=False,
                                           add_generation_prompt=True)
    inputs = processor(text=[prompt], images=load_images(image_sample), return_tensors="pt", add_special_tokens=False)
    family_kwargs = adapter_for(family).generation_kwargs()  # MoE: no router logits (a transformers bug)
    with torch.no_grad():
        greedy = after.generate(**inputs, max_new_tokens=4, do_sample=False, **family_kwargs)
        generated = after.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, **family_kwargs)
    new = greedy[0, inputs["input_ids"].shape[1]:]
    # the batched, left-padded answer of the image sample is the model's own greedy answer to it alone
    assert answers[0] == processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert len(answers) == 2 and generated.shape[1] == inputs["input_ids"].shape[1] + 4


def test_each_optimizer_group_holds_its_configured_learning_rate(family_run):
    family, model_dir, out, _ = family_run
    recorded = json.loads((out / "run_config.json").read_text())
    config = _run_config(out)
    model, _ = _load(model_dir)
    expected = param_groups(set_trainable(model, adapter_for(family), config.model), config.optim)
    groups = recorded["optimizer_groups"]  # read back from engine.optimizer.param_groups after initialize
    assert [g["name"] for g in groups] == [g["name"] for g in expected]
    lrs = RUNS[family][1]
    parts_of = {g["name"]: g["name"].removesuffix("_no_decay").split("+") for g in groups}
    assert {p for parts in parts_of.values() for p in parts} == set(lrs)
    for group in groups:
        for part in parts_of[group["name"]]:  # parts with equal lr share a group
            assert group["lr"] == group["initial_lr"] == lrs[part], group  # warmup 0: step 1 at the peak lr
        assert group["weight_decay"] == (0.0 if group["name"].endswith("_no_decay") else config.optim.weight_decay)


def test_resumed_run_ends_where_the_uninterrupted_one_did(family_run, family_resumed):
    """Exact resume: step 5's loss and every exported tensor (the weights after the resumed optimizer's step, so its
    moments and the learning rate too) equal the uninterrupted run's."""
    family, _, out, _ = family_run
    [again] = read_metrics(family_resumed)
    assert again["step"] == STEPS
    assert again["loss"] == pytest.approx(read_metrics(out)[-1]["loss"], rel=1e-6), family
    uninterrupted, resumed = (dict(_load(path)[0].named_parameters()) for path in (out / "hf", family_resumed / "hf"))
    assert uninterrupted.keys() == resumed.keys()
    differ = [n for n, p in uninterrupted.items() if not torch.allclose(p, resumed[n], rtol=1e-6, atol=1e-7)]
    assert not differ, (family, differ[:5])
