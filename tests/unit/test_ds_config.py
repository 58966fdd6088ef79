"""The DeepSpeed json contract and the optimizer the machine can have."""

from __future__ import annotations

import json
import re

import pytest
from fixtures.datasets import write_json
from fixtures.runs import ROOT

from ds_vlm.config import ConfigError, TrainConfig
from ds_vlm.train.ds_config import resolve_ds_config


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")))
def test_shipped_ds_configs_resolve_without_edits(name):
    config = TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(ROOT / "ds_configs" / name),
                         micro_batch_size=3, grad_accum=2, grad_clip=0.7, lr=1e-4)
    ds = resolve_ds_config(config, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.7
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 1e-4
    assert ds["bf16"]["enabled"] is False  # no GPU here: fp32


def test_contradicting_json_value_is_an_error_naming_key_and_flag(tmp_path):
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ok = write_json(tmp_path / "ok.json", {**ds, "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": 2})
    resolve_ds_config(TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(ok), micro_batch_size=2), 1)
    bad = write_json(tmp_path / "bad.json", {**ds, "gradient_clipping": 0.5})
    message = "gradient_clipping = 0.5 contradicts --grad_clip (resolved to 1.0)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_ds_config(TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(bad)), 1)
    sched = write_json(tmp_path / "sched.json", {**ds, "scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="remove 'scheduler'"):
        resolve_ds_config(TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(sched)), 1)


def test_the_optimizer_falls_back_to_torch_adamw_where_fused_adam_cannot_be_built(monkeypatch, capsys):
    from deepspeed.accelerator import get_accelerator

    from ds_vlm.config import TrainConfig
    from ds_vlm.train.ds_config import DSSettings, resolve_ds_config, settle_optimizer

    config = TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(ROOT / "ds_configs" / "zero2.json"))
    accelerator = get_accelerator()

    class Broken:
        name = "fused_adam"  # settle_optimizer clears a stale build lock by the op's name first

        def load(self, verbose=False):
            raise RuntimeError("nvcc not found: CUDA_HOME does not exist")

    class Built:
        name = "fused_adam"

        def load(self, verbose=False):
            return object()

    monkeypatch.setattr(accelerator, "create_op_builder", lambda name: Built())
    ds = resolve_ds_config(config, 1)
    chosen = settle_optimizer(DSSettings.of(ds))
    assert chosen.description == "DeepSpeed FusedAdam" and "torch_adam" not in chosen.applied(ds)["optimizer"]["params"]
    monkeypatch.setattr(accelerator, "create_op_builder", lambda name: Broken())
    ds = resolve_ds_config(config, 1)
    chosen = settle_optimizer(DSSettings.of(ds))
    assert chosen.description.startswith("torch AdamW") and chosen.applied(ds)["optimizer"]["params"]["torch_adam"]
    assert "torch_adam" not in ds["optimizer"]["params"]  # a value: the json changes only where the caller takes it
    assert "FusedAdam op cannot be built here (RuntimeError: nvcc not found" in capsys.readouterr().err
    offload = resolve_ds_config(TrainConfig.from_keys(model="m", train_data="d",
                                            deepspeed=str(ROOT / "ds_configs" / "zero3_offload.json")), 1)
    assert settle_optimizer(DSSettings.of(offload)).description == "DeepSpeed CPU Adam (ZeRO-Offload)"


def test_ds_settings_read_the_json_once():
    import torch

    from ds_vlm.config import TrainConfig
    from ds_vlm.train.ds_config import DSSettings, resolve_ds_config

    offload = resolve_ds_config(TrainConfig.from_keys(model="m", train_data="d", optimizer="muon",
                                                      deepspeed=str(ROOT / "ds_configs" / "zero3_offload.json")), 1)
    ds = DSSettings.of(offload)
    assert (ds.stage, ds.bf16, ds.muon, ds.offload_optimizer, ds.ep) == (3, False, True, True, 1)  # no GPU: fp32
    assert ds.dtype == torch.float32 and ds.bytes_per_param == 4 and ds.zero is offload["zero_optimization"]
    assert DSSettings.of({}) == DSSettings() and DSSettings().stage == 0 and not DSSettings().bf16


def test_muon_by_flag_or_json(tmp_path):
    """--optimizer muon, or a json whose optimizer type is Muon (with --optimizer auto): DeepSpeed's Muon with
    --muon_lr and --muon_momentum; ZeRO-3 without reduce-scatter (DeepSpeed's ZeRO-3 Muon refuses it)."""
    def resolve(ds_path, **keys):
        return resolve_ds_config(TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(ds_path), **keys), 2)

    ds = resolve(ROOT / "ds_configs" / "zero3.json", optimizer="muon", muon_lr=0.01)
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "Muon" and params["muon_lr"] == 0.01 and params["momentum"] == 0.95
    assert ds["zero_optimization"]["reduce_scatter"] is False
    in_json = write_json(tmp_path / "muon.json", {"zero_optimization": {"stage": 2},
                                                  "optimizer": {"type": "Muon", "params": {"momentum": 0.9}}})
    assert resolve(in_json, muon_momentum=0.9)["optimizer"]["type"] == "Muon"
    with pytest.raises(ConfigError, match=re.escape("momentum = 0.9 contradicts --muon_momentum")):
        resolve(in_json)
    with pytest.raises(ConfigError, match="optimizer type 'muon' contradicts --optimizer adamw"):
        resolve(in_json, optimizer="adamw", muon_momentum=0.9)
    assert resolve(ROOT / "ds_configs" / "zero2.json")["optimizer"]["type"] == "AdamW"
    scatter = write_json(tmp_path / "scatter.json", {"zero_optimization": {"stage": 3, "reduce_scatter": True}})
    with pytest.raises(ConfigError, match="cannot reduce-scatter"):
        resolve(scatter, optimizer="muon")
    quantized = write_json(tmp_path / "qgz.json", {"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}})
    with pytest.raises(ConfigError, match="Muon cannot use zero_quantized_gradients"):
        resolve(quantized, optimizer="muon")
    pp = resolve(ROOT / "ds_configs" / "zero3pp.json", optimizer="muon")["zero_optimization"]
    assert pp["zero_quantized_gradients"] is False  # "auto" resolves off under Muon, even on CUDA
    with pytest.raises(ConfigError, match="'lion' is not supported"):
        resolve(write_json(tmp_path / "lion.json", {"optimizer": {"type": "Lion"}}))


def test_zero_plus_plus_auto_values():
    """zero3pp.json: hpZ's secondary partition is the ranks of a node where there are several nodes, off on one
    node; quantized weights and gradients only where CUDA is (DeepSpeed's quantizer kernels)."""
    import torch

    config = TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(ROOT / "ds_configs" / "zero3pp.json"))
    zero = resolve_ds_config(config, 16, ranks_per_node=8)["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == 8
    assert zero["zero_quantized_weights"] is zero["zero_quantized_gradients"] is torch.cuda.is_available()
    assert resolve_ds_config(config, 8, ranks_per_node=8)["zero_optimization"]["zero_hpz_partition_size"] == 1
    assert resolve_ds_config(config, 2, ranks_per_node=1)["zero_optimization"]["zero_hpz_partition_size"] == 1


def test_zero_plus_plus_values_that_cannot_work(tmp_path):
    def resolve(zero, world_size=4):
        path = write_json(tmp_path / "z.json", {"zero_optimization": zero})
        return resolve_ds_config(TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(path)), world_size)

    with pytest.raises(ConfigError, match="zero_hpz_partition_size 3 needs ZeRO stage 3 and a world size it divides"):
        resolve({"stage": 3, "zero_hpz_partition_size": 3})
    with pytest.raises(ConfigError, match="needs ZeRO stage 3"):
        resolve({"stage": 2, "zero_hpz_partition_size": 2})
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="zero_quantized_weights needs CUDA"):
            resolve({"stage": 3, "zero_quantized_weights": True})


def test_expert_parallel_section(tmp_path):
    """--expert_parallel N writes AutoEP's section; a json's own section is read (its size must agree); the
    adapter adds the preset (qwen3_vl_moe and qwen3_5_moe: AutoEP's qwen3_moe layout) and the text config's
    top-k."""
    from types import SimpleNamespace

    from ds_vlm.models import adapter_for
    from ds_vlm.parallel.expert import fill_autoep_section

    def resolve(ds_path, world=4, **keys):
        keys = {"export_hf": False, **keys}
        return resolve_ds_config(TrainConfig.from_keys(model="m", train_data="d", deepspeed=str(ds_path), **keys),
                                 world)

    ds = resolve(ROOT / "ds_configs" / "zero2.json", expert_parallel=2)
    assert ds["expert_parallel"] == {"enabled": True, "autoep_size": 2}
    text = SimpleNamespace(num_experts_per_tok=8)
    config = SimpleNamespace(get_text_config=lambda: text)
    section = fill_autoep_section(ds, adapter_for("qwen3_vl_moe"), config, export_hf=False)
    assert section["preset_model"] == "qwen3_moe" and section["top_k"] == 8
    assert section["moe_layer_pattern"] == r"model\.language_model\.layers\.\d+\.mlp"
    with pytest.raises(ConfigError, match="qwen3_vl has no MoE blocks"):
        fill_autoep_section(resolve(ROOT / "ds_configs" / "zero2.json", expert_parallel=2), adapter_for("qwen3_vl"),
                            config, export_hf=False)
    in_json = write_json(tmp_path / "ep.json", {"expert_parallel": {"enabled": True, "autoep_size": 4, "top_k": 4}})
    assert resolve(in_json)["expert_parallel"]["autoep_size"] == 4
    assert fill_autoep_section(resolve(in_json), adapter_for("qwen3_vl_moe"), config, False)["top_k"] == 4  # json's
    with pytest.raises(ConfigError, match="autoep_size = 4 contradicts --expert_parallel 2"):
        resolve(in_json, expert_parallel=2)
    with pytest.raises(ConfigError, match="world size 4 is not a multiple"):
        resolve(ROOT / "ds_configs" / "zero2.json", expert_parallel=3)
    # the HF export gathers the experts (ZeRO-2 and ZeRO-3: tests/dist/test_expert.py); with LoRA it is refused
    for stage in (2, 3):
        assert fill_autoep_section(resolve(ROOT / "ds_configs" / f"zero{stage}.json", expert_parallel=2),
                                   adapter_for("qwen3_vl_moe"), config, export_hf=True)["autoep_size"] == 2
    with pytest.raises(ConfigError, match="--export_hf false"):
        fill_autoep_section(resolve(ROOT / "ds_configs" / "zero2.json", expert_parallel=2), adapter_for("qwen3_vl_moe"),
                            config, export_hf=True, lora=True)
    assert fill_autoep_section(resolve(ROOT / "ds_configs" / "zero2.json", expert_parallel=2),
                               adapter_for("qwen3_5_moe"), config, export_hf=False)["preset_model"] == "qwen3_moe"
    assert "expert_parallel" not in resolve(ROOT / "ds_configs" / "zero2.json")
