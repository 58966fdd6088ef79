"""The typed config in sections: flags over YAML, coercion, unknown keys, allowed values from the Literals (the one
place they are listed), aliases, the flag table in the docs, flat keys in and out, the preflight modes."""

from __future__ import annotations

import pytest
from fixtures.runs import ROOT

from ds_vlm.config import ConfigError, TrainConfig, choices, key_table
from ds_vlm.flags import load_config

BASE = ["--model", "m", "--train_data", "d.jsonl"]


def test_flags_win_over_yaml_and_yaml_types_are_coerced(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 2e-5\nmicro_batch_size: 4\ntrain_llm: false\ndeepspeed: ds_configs/zero2.json\n")
    config = load_config(["--config", str(cfg), *BASE, "--micro_batch_size", "2", "--local_rank=1"])
    assert config.optim.lr == 2e-5 and config.batch.micro_batch_size == 2 and config.model.train_llm is False
    assert config.parallel.deepspeed == "ds_configs/zero2.json" and config.model.path == "m"


def test_unknown_yaml_key_and_bad_values_are_named(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        load_config(["--config", str(cfg), *BASE])
    with pytest.raises(ConfigError, match="--train_vision 'some'"):
        load_config([*BASE, "--train_vision", "some"])
    with pytest.raises(ConfigError, match="both set"):
        load_config([*BASE, "--train_vision", "all", "--unfreeze_vision_layers", "2"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        TrainConfig.from_keys(learning_rate=1e-4)


def test_the_flag_table_in_the_docs_is_the_config():
    """docs/training.md holds `python -m ds_vlm.flags`'s table: every key, its section, default and values."""
    from ds_vlm.flags import flag_table

    text = (ROOT / "docs" / "training.md").read_text()
    table = text.split("<!-- flags:begin -->\n", 1)[1].split("\n<!-- flags:end -->", 1)[0]
    assert table == flag_table()
    for key, (section, _) in key_table().items():
        assert f"| `{key}` | {section or 'run'} |" in table, key


def test_flat_keys_go_to_their_sections_and_come_back():
    """What flags, YAML and checkpoints hold (flat keys) builds the sections and is what to_keys gives back: a
    checkpoint written before the sections (its "config" is such a dict) resumes the same way."""
    keys = {"model": "m", "train_data": "d", "lr": 1e-3, "micro_batch_size": 3, "sequence_parallel": 2,
            "output_dir": "out", "logging_steps": 7, "seed": 5, "max_length": 512}
    config = TrainConfig.from_keys(**keys)
    assert (config.model.path, config.data.train_data, config.optim.lr, config.batch.micro_batch_size,
            config.parallel.sequence_parallel, config.checkpoint.output_dir, config.logging.logging_steps,
            config.seed, config.data.max_length) == tuple(keys.values())
    flat = config.to_keys()
    assert {k: flat[k] for k in keys} == keys and TrainConfig.from_keys(**flat) == config
    assert len(flat) == len(key_table()) and all("." not in k for k in flat)


def test_literal_values_are_checked_and_aliases_map(tmp_path):
    with pytest.raises(ConfigError, match="--loss 'fused': must be one of chunked, liger, full"):
        load_config([*BASE, "--loss", "fused"])
    assert load_config([*BASE, "--unfreeze_vision_layers", "3"]).model.train_vision == "last:3"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("unfreeze_vision_layers: 2\nprecision: bf16\n")
    config = load_config(["--config", str(cfg), *BASE])
    assert config.model.train_vision == "last:2" and config.model.precision == "bf16"


def test_modules_take_allowed_values_from_the_config():
    """Record layouts and losses are listed once, as the config's Literal types; the readers and the loss table
    use those (a layout or loss added to one place only would fail here)."""
    from ds_vlm.data import formats
    from ds_vlm.train.loss import LOSS_FUNCTIONS

    assert formats.LAYOUTS == choices("data_format") and set(formats.LAYOUT_KEYS) == set(formats.LAYOUTS) - {"auto"}
    assert set(LOSS_FUNCTIONS) == set(choices("loss"))


def test_preflight_flags_are_checked():
    assert TrainConfig.from_keys(model="m", train_data="d", preflight="sample:100").validate(for_training=False)
    for bad in ("sample", "sample:0", "fast"):
        with pytest.raises(ConfigError, match="--preflight"):
            TrainConfig.from_keys(model="m", train_data="d", preflight=bad).validate(for_training=False)
    with pytest.raises(ConfigError, match="--max_tokens_per_batch needs every record's length"):
        TrainConfig.from_keys(model="m", train_data="d", preflight="off",
                              max_tokens_per_batch=4096).validate(for_training=False)


# A checkpoint's "config" as the flat TrainConfig wrote it before the sections (02b8d39), frozen here.
FLAT_CONFIG_02B8D39 = {
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-08, "attn_implementation": "auto", "bad_records": "error",
    "data_cache": "", "data_format": "auto", "deepspeed": "ds_configs/zero3.json", "dist_timeout_s": 900, "epochs": 1,
    "eval_data": "", "eval_generate": 8, "eval_steps": 0, "export_hf": True, "grad_accum": 1, "grad_clip": 1.0,
    "gradient_checkpointing": True, "image_root": "", "logging_steps": 1, "lora_alpha": 16.0, "lora_bits": 0,
    "lora_dropout": 0.05, "lora_rank": 0, "lora_targets": "default", "loss": "chunked", "lr": 2e-05, "max_bad": 0,
    "max_bad_steps": 5, "max_length": 4096, "max_pixels": 0, "max_steps": -1, "max_tokens_per_batch": 0,
    "micro_batch_size": 1, "min_lr_ratio": 0.0, "min_pixels": 0, "model": "m", "num_workers": -1,
    "output_dir": "runs/latest", "packing": False, "peak_tflops": 0.0, "precision": "auto", "preflight": "cached",
    "projector_lr": 0.0, "report_to": "none", "resume": "auto", "resume_ignore_config": False, "save_steps": 0,
    "save_total_limit": 0, "seed": 42, "sequence_parallel": 1, "train_data": "d.jsonl", "train_llm": True,
    "train_projector": True, "train_vision": "none", "truncation": "error", "trust_remote_code": False,
    "video_fps": 2.0, "video_max_frames": 32, "video_max_pixels": 0, "vision_checkpointing": False,
    "vision_lr": 0.0, "warmup_ratio": 0.03, "weight_decay": 0.0,
}


def test_a_checkpoint_written_with_the_flat_config_still_resumes():
    """The flat keys an older checkpoint holds rebuild the same sectioned config, and the resume check finds
    no difference against the same run configured today; its marker, which lacks the keys added since (the
    data-parallel and sequence-parallel sizes, the LoRA description), reads with what they meant then."""
    import dataclasses

    from ds_vlm.checkpoint.meta import CheckpointMeta
    from ds_vlm.checkpoint.resume import config_differences

    today = TrainConfig.from_keys(model="m", train_data="d.jsonl")
    assert TrainConfig.from_keys(**FLAT_CONFIG_02B8D39) == today
    added = set(today.to_keys()) - set(FLAT_CONFIG_02B8D39)  # keys added since, each at its default
    assert added == {"verbose", "plan_at_start", "measure_memory", "plan_memory_gb", "caption_prompt", "optimizer",
                     "muon_lr", "muon_momentum", "expert_parallel", "long_phase_timeout_s"}
    assert {k: today.to_keys()[k] for k in FLAT_CONFIG_02B8D39} == FLAT_CONFIG_02B8D39
    # the marker of a checkpoint written by 7eb6a58 (the first with checkpoints), with that config
    marker = {"world_size": 8, "zero_stage": 2, "global_batch": 8, "total_steps": 10, "n_train_samples": 80,
              "config": FLAT_CONFIG_02B8D39, "step": 4, "time": 1764400000.0}
    saved = CheckpointMeta.from_json(marker)
    assert saved.step == 4 and saved.to_json() == {**marker, "data_parallel_size": 8, "sequence_parallel": 1,
                                                   "lora": None}
    assert list(saved.to_json()) == ["world_size", "data_parallel_size", "sequence_parallel", "zero_stage",
                                     "global_batch", "lora", "total_steps", "n_train_samples", "config", "step",
                                     "time"]  # the marker's keys as checkpoints write them
    now = dataclasses.replace(saved.run, config=today.to_keys())
    assert config_differences(saved.run, now) == []
    changed = dataclasses.replace(saved.run, config={**FLAT_CONFIG_02B8D39, "lr": 1e-4})
    assert config_differences(changed, now) == ["lr: checkpoint 0.0001, now 2e-05"]


def test_resuming_at_another_expert_parallel_size(tmp_path):
    """Another EP size resumes through the universal format where the checkpoint holds AutoEP's layout (its
    layer_L_expert_E files); a checkpoint of transformers' fused layout at EP > 1, or one of ZeRO stage 0 at
    another size, is refused with the way out (tests/dist/test_expert.py resumes 2 -> 1 -> 2 for real)."""
    from ds_vlm.checkpoint.meta import RunMeta
    from ds_vlm.checkpoint.resume import expert_parallel_change, holds_autoep_layers

    def meta(ep, stage=2):
        return RunMeta(2, 2, 1, stage, 2, None, 4, 8, {"expert_parallel": ep})

    plain, autoep = tmp_path / "plain", tmp_path / "autoep"
    plain.mkdir(), autoep.mkdir()
    (autoep / "layer_0_expert_0_mp_rank_00_model_states.pt").touch()
    assert not holds_autoep_layers(plain) and holds_autoep_layers(autoep)
    assert expert_parallel_change(autoep, meta(2), meta(1)) and expert_parallel_change(autoep, meta(1), meta(2))
    assert not expert_parallel_change(autoep, meta(2), meta(2)) and not expert_parallel_change(plain, meta(1), meta(1))
    with pytest.raises(ConfigError, match="saved without expert parallelism"):
        expert_parallel_change(plain, meta(1), meta(2))
    with pytest.raises(ConfigError, match="ZeRO stage 0"):
        expert_parallel_change(autoep, meta(2, stage=0), meta(1, stage=0))
