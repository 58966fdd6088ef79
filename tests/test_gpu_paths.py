"""The logic of the CUDA-only paths, on a CPU: where a collective communicates, Qwen's patch embedding as a
linear layer, QLoRA's flags and merge on a stand-in 4-bit layer, the sync-free liger wrapper on a stand-in
kernel, the optimizer and op-folder fallbacks, the loader's worker count, per-step memory peaks, what is cast.
What only a GPU can confirm runs in `launch/gpu_check.sh` (its dry run: tests/test_bench.py)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from ds_vlm import distributed
from ds_vlm.demo import FAMILIES

COLLECTIVES = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|broadcast|all_gather\w*|reduce_scatter\w*|"
                         r"all_to_all\w*|barrier|gather|scatter|reduce|broadcast_object_list|send|recv)\(")


def test_every_collective_goes_through_distributed_py():
    """A collective called directly elsewhere would put whatever tensor it has on the wire: the bug of a CPU
    tensor on the default group of an NCCL job, which gloo accepts and no CPU test sees."""
    offenders = []
    for path in sorted((ROOT / "ds_vlm").rglob("*.py")):
        if path.name == "distributed.py" and path.parent.name == "ds_vlm":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if COLLECTIVES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_communication_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "gloo")
    assert distributed.comm_device() == torch.device("cpu")
    assert distributed.backend_device_type("cpu:gloo,cuda:nccl") == "cuda"


def test_a_collective_runs_on_the_group_device_and_lands_where_the_caller_keeps_it(monkeypatch):
    """What `_run` does when the caller's tensor lives elsewhere than the group communicates (a CPU tensor on
    NCCL): a copy goes on the wire, and the result comes back into the caller's tensor (waited for, or on
    wait() of the returned handle). Simulated with float64 standing for "the other device"."""
    seen = []

    def fake_all_reduce(tensor, group=None, async_op=False, op=None):
        seen.append(tensor.dtype)
        tensor.mul_(2)
        return None

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device: self.double() if device == "other" else self)
    monkeypatch.setattr(distributed, "comm_device", lambda group=None: "other")
    flag = torch.tensor([1.0, 3.0])
    distributed.all_reduce(flag)
    assert seen == [torch.float64] and flag.tolist() == [2.0, 6.0]
    work = distributed.all_reduce(flag, async_op=True)
    assert flag.tolist() == [2.0, 6.0]  # not yet copied back
    work.wait()
    assert flag.tolist() == [4.0, 12.0]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_patch_projection_equals_the_conv3d(family, family_models):
    """Qwen's patch embedding run as one linear layer over the flattened patch: the same output and the same
    gradients (input, weight, bias) as the Conv3d, in fp32; the parameters, their names and the state dict
    are untouched (checkpoints, exports and loaded weights do not change)."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.models import adapter_for
    from ds_vlm.models.qwen import PatchProjection

    model = AutoModelForImageTextToText.from_pretrained(family_models(family), dtype=torch.float32)
    embed = model.model.visual.patch_embed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patches = torch.randn(12, embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2,
                          requires_grad=True)

    def run():
        for p in embed.parameters():
            p.grad = None
        patches.grad = None
        out = embed(patches)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), patches.grad.clone(), [p.grad.clone() for p in embed.parameters()]

    conv = run()
    adapter_for(model.config.model_type).prepare(model)
    assert type(embed.proj) is PatchProjection and isinstance(embed.proj, torch.nn.Conv3d)
    linear = run()
    torch.testing.assert_close(linear[0], conv[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(linear[1], conv[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(linear[2], conv[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


class _Fake4bit(torch.nn.Parameter):
    """A stand-in for bitsandbytes' Params4bit: integer storage and a quant_state (here: the scale)."""

    def __new__(cls, full: torch.Tensor):
        scale = full.abs().max() / 7
        param = super().__new__(cls, (full / scale).round().to(torch.int8) + 8, requires_grad=False)
        param.quant_state = types.SimpleNamespace(scale=scale, dtype=torch.float32, shape=full.shape)
        return param


def _fake_bitsandbytes(monkeypatch):
    functional = types.ModuleType("bitsandbytes.functional")
    functional.dequantize_4bit = lambda data, state: (data.float() - 8) * state.scale
    package = types.ModuleType("bitsandbytes")
    package.functional = functional
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)


def test_qlora_flags_and_merge_on_a_stand_in_4bit_layer(demo_dir, monkeypatch):
    """QLoRA's two crashes, on a stand-in 4-bit layer (integer weight + quant_state, as bitsandbytes keeps them):
    set_trainable leaves integer weights frozen inside a trained part (requires_grad_ on one raises), LoRA
    still targets the quantized layer, and the merged export dequantizes it first (W + B A x alpha / r, in
    full precision) and keeps no quantization entries or config."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.checkpoint import plain_model
    from ds_vlm.config import TrainConfig
    from ds_vlm.engine import set_trainable
    from ds_vlm.lora import apply_lora, dequantized_state_dict, is_quantized, merged_state_dict
    from ds_vlm.models import adapter_for

    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model", dtype=torch.float32)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    full = layer.weight.detach().clone()
    layer.weight = _Fake4bit(full)
    with pytest.raises(RuntimeError, match="floating point"):
        layer.weight.requires_grad_(True)  # what set_trainable did before
    adapter = adapter_for("qwen3_vl")
    config = TrainConfig(model=str(demo_dir / "model"), train_data="d", lora_rank=4, lora_alpha=8, lora_bits=4)
    set_trainable(model, adapter, config)
    assert is_quantized(layer) and not layer.weight.requires_grad
    assert model.model.language_model.layers[0].self_attn.k_proj.weight.requires_grad
    peft_model, peft_config = apply_lora(model, adapter, config)
    assert "model.language_model.layers.0.self_attn.q_proj" in peft_config.target_modules
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    _fake_bitsandbytes(monkeypatch)
    base = peft_model.get_base_model().model.language_model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="dequantize the state dict before merging"):
        merged_state_dict(state, peft_config)
    merged = merged_state_dict(dequantized_state_dict(peft_model, state), peft_config)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    dequantized = (base.base_layer.weight.float() - 8) * base.base_layer.weight.quant_state.scale
    expected = dequantized + base.lora_B["default"].weight @ base.lora_A["default"].weight * (8 / 4)
    torch.testing.assert_close(merged[key], expected)
    torch.testing.assert_close(dequantized, full, atol=float(full.abs().max()) / 7, rtol=0)  # 4-bit rounding
    assert all(v.is_floating_point() for v in merged.values())
    model.config.quantization_config = {"load_in_4bit": True}
    plain = plain_model(model.config, merged)
    assert not hasattr(plain.config, "quantization_config") and hasattr(model.config, "quantization_config")


def test_liger_wrapper_scales_gradients_without_a_host_sync(monkeypatch):
    """--loss liger through a stand-in for liger's forward (which computes the loss and its gradients at once,
    as the Triton kernel does): the loss and gradients equal the chunked loss's, the weight gradient is
    accumulated in fp32 (asked for), and the backward reads nothing back from the device."""
    from ds_vlm.loss import chunked_loss_sum, liger_loss_sum

    asked = {}

    def forward(hidden, weight, targets, bias=None, reduction="mean", accum_dtype=None, **kwargs):
        asked.update(reduction=reduction, accum_dtype=accum_dtype)
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss = torch.nn.functional.cross_entropy(h @ w.t(), targets, reduction="sum")
            grad_h, grad_w = torch.autograd.grad(loss, (h, w))
        return loss.detach(), None, None, None, grad_h, grad_w.to(accum_dtype), None

    ops = types.ModuleType("liger_kernel.ops.fused_linear_cross_entropy")
    ops.fused_linear_cross_entropy_forward = forward
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_linear_cross_entropy", ops)
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (6,))
    results = []
    for fn in (chunked_loss_sum, liger_loss_sum):
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, None, targets)
        if fn is liger_loss_sum:
            monkeypatch.setattr(torch, "equal", lambda *a: pytest.fail("torch.equal: a host sync"))
            monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail(".item(): a host sync"))
        (loss * 0.25).backward()
        results.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    assert asked == {"reduction": "sum", "accum_dtype": torch.float32}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_optimizer_falls_back_to_torch_adamw_where_fused_adam_cannot_be_built(monkeypatch, capsys):
    from deepspeed.accelerator import get_accelerator

    from ds_vlm.config import TrainConfig
    from ds_vlm.engine import resolve_ds_config, settle_optimizer

    config = TrainConfig(model="m", train_data="d", deepspeed=str(ROOT / "ds_configs" / "zero2.json"))
    accelerator = get_accelerator()

    class Broken:
        def load(self, verbose=False):
            raise RuntimeError("nvcc not found: CUDA_HOME does not exist")

    class Built:
        def load(self, verbose=False):
            return object()

    monkeypatch.setattr(accelerator, "create_op_builder", lambda name: Built())
    ds = resolve_ds_config(config, 1)
    assert settle_optimizer(ds) == "DeepSpeed FusedAdam" and "torch_adam" not in ds["optimizer"]["params"]
    monkeypatch.setattr(accelerator, "create_op_builder", lambda name: Broken())
    ds = resolve_ds_config(config, 1)
    assert settle_optimizer(ds).startswith("torch AdamW") and ds["optimizer"]["params"]["torch_adam"] is True
    assert "FusedAdam op cannot be built here (RuntimeError: nvcc not found" in capsys.readouterr().err
    offload = resolve_ds_config(TrainConfig(model="m", train_data="d",
                                            deepspeed=str(ROOT / "ds_configs" / "zero3_offload.json")), 1)
    assert settle_optimizer(offload) == "DeepSpeed CPU Adam (ZeRO-Offload)"


def test_the_op_build_folder_falls_back_to_a_per_user_one_when_the_environment_is_read_only(monkeypatch, tmp_path):
    import ds_vlm

    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    assert ds_vlm._extensions_dir() == str(tmp_path / "venv" / "torch_extensions")
    monkeypatch.setattr(ds_vlm.os, "access", lambda path, mode: False)  # a read-only shared install
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    chosen = Path(ds_vlm._extensions_dir())
    assert chosen.parent == tmp_path / "home" / ".cache" / "ds_vlm" / "torch_extensions"
    assert chosen.name.startswith("venv-")


def test_loader_workers_come_from_the_cores_per_local_rank(monkeypatch):
    from ds_vlm.config import TrainConfig

    monkeypatch.setenv("LOCAL_SIZE", "8")
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert distributed.default_loader_workers(cuda=True) == 8  # 12 cores a rank: 11, at most 8
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(24)), raising=False)
    assert distributed.default_loader_workers(cuda=True) == 2  # 3 cores a rank, one for the rank itself
    assert distributed.default_loader_workers(cuda=False) == 1  # CPU ranks compute on their cores
    assert TrainConfig(num_workers=3).loader_workers == 3


def test_each_logged_step_has_its_own_memory_peak():
    """On CPU the peak RSS (VmHWM) is reset at each logged step; a big allocation raises it, the next reset
    brings it back down."""
    from ds_vlm.metrics import peak_memory_gb, reset_peak_memory

    reset_peak_memory()
    before, _ = peak_memory_gb()
    block = torch.ones(200 * 2 ** 20, dtype=torch.uint8)  # 200 MB touched
    during, _ = peak_memory_gb()
    del block
    reset_peak_memory()
    after, _ = peak_memory_gb()
    assert during > before + 0.15 and after < during - 0.15


def test_only_the_pixels_take_the_model_dtype():
    """Qwen's second_per_grid_ts are times in seconds: bf16 would round 0.5 s steps of a long video."""
    from ds_vlm.step import StepRunner

    runner = StepRunner.__new__(StepRunner)
    runner.device, runner.dtype = torch.device("cpu"), torch.bfloat16
    moved = runner.to_device({"pixel_values": torch.ones(2, 3), "pixel_values_videos": torch.ones(2, 3),
                              "second_per_grid_ts": torch.tensor([1000.5]), "input_ids": torch.ones(1, 2).long()})
    assert moved["pixel_values"].dtype == moved["pixel_values_videos"].dtype == torch.bfloat16
    assert moved["second_per_grid_ts"].dtype == torch.float32 and moved["second_per_grid_ts"].item() == 1000.5
