"""Config: YAML + flags, validation, and the DeepSpeed json the trainer resolves."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from conftest import ROOT, write_json

from ds_vlm.config import ConfigError, TrainConfig, load_config
from ds_vlm.engine import lr_lambda, resolve_ds_config

BASE = ["--model", "m", "--train_data", "d.jsonl"]


def test_flags_win_over_yaml_and_yaml_types_are_coerced(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 2e-5\nmicro_batch_size: 4\ntrain_llm: false\ndeepspeed: ds_configs/zero2.json\n")
    config = load_config(["--config", str(cfg), *BASE, "--micro_batch_size", "2", "--local_rank=1"])
    assert config.lr == 2e-5 and config.micro_batch_size == 2 and config.train_llm is False
    assert config.deepspeed == "ds_configs/zero2.json"


def test_unknown_yaml_key_and_bad_values_are_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        load_config(["--config", str(cfg), *BASE])
    with pytest.raises(ConfigError, match="--train_vision 'some'"):
        load_config([*BASE, "--train_vision", "some"])
    with pytest.raises(ConfigError, match="both set"):
        load_config([*BASE, "--train_vision", "all", "--unfreeze_vision_layers", "2"])


def test_the_flag_table_in_the_docs_is_the_config():
    """docs/training.md holds `python -m ds_vlm.config`'s table: every key, its default and its values."""
    from ds_vlm.config import flag_table

    text = (ROOT / "docs" / "training.md").read_text()
    table = text.split("<!-- flags:begin -->\n", 1)[1].split("\n<!-- flags:end -->", 1)[0]
    assert table == flag_table()
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in table, f.name


def test_literal_values_are_checked_and_aliases_map(tmp_path):
    with pytest.raises(ConfigError, match="--loss 'fused': must be one of chunked, liger, full"):
        load_config([*BASE, "--loss", "fused"])
    assert load_config([*BASE, "--unfreeze_vision_layers", "3"]).train_vision == "last:3"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("unfreeze_vision_layers: 2\nprecision: bf16\n")
    config = load_config(["--config", str(cfg), *BASE])
    assert config.train_vision == "last:2" and config.precision == "bf16"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_shipped_ds_configs_resolve_without_edits(name):
    config = TrainConfig(model="m", train_data="d", deepspeed=str(ROOT / "ds_configs" / name),
                         micro_batch_size=3, grad_accum=2, grad_clip=0.7, lr=1e-4)
    ds = resolve_ds_config(config, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.7
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["bf16"]["enabled"] is False  # no GPU here: fp32


def test_contradicting_json_value_is_an_error_naming_key_and_flag(tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ok = write_json(tmp_path / "ok.json", {**ds, "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": 2})
    resolve_ds_config(TrainConfig(model="m", train_data="d", deepspeed=str(ok), micro_batch_size=2), 1)
    bad = write_json(tmp_path / "bad.json", {**ds, "gradient_clipping": 0.5})
    with pytest.raises(ConfigError, match=re.escape("gradient_clipping = 0.5 contradicts --grad_clip (resolved to 1.0)")):
        resolve_ds_config(TrainConfig(model="m", train_data="d", deepspeed=str(bad)), 1)
    sched = write_json(tmp_path / "sched.json", {**ds, "scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="remove 'scheduler'"):
        resolve_ds_config(TrainConfig(model="m", train_data="d", deepspeed=str(sched)), 1)


def test_warmup_then_cosine():
    f = lr_lambda(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(99) == pytest.approx(0.1, abs=1e-3)
    assert all(f(s) >= f(s + 1) for s in range(10, 99))
