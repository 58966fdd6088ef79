"""The DeepSpeed config of a run: the user's json (ZeRO settings) plus everything the trainer decides, what the
rest of ds-vlm reads of it (`DSSettings`, parsed once), and which AdamW the run can have on this machine."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ds_vlm.config import ConfigError, ModelConfig, TrainConfig
from ds_vlm.parallel.expert import ep_size_of, expert_parallel_size
from ds_vlm.runtime.console import say_once
from ds_vlm.runtime.distributed import local_world_size


@dataclass(frozen=True)
class DSSettings:
    """What ds-vlm reads of a DeepSpeed json, parsed once (`DSSettings.of`) and passed down: to the model's
    loading, the planner at start and its CLI, the trainer's log and resume record, the optimizer's choice.
    `zero` is the zero_optimization section as it is (its buckets, live parameters, persistence threshold and
    hpZ are what the planner's model_states reads); `json` the whole dict, what HfDeepSpeedConfig and
    deepspeed.initialize are given."""

    stage: int = 0
    bf16: bool = False
    optimizer: str = "AdamW"  # the json's optimizer type: AdamW or Muon once resolved
    offload_optimizer: bool = False
    offload_param: bool = False
    ep: int = 1  # expert parallelism (AutoEP's autoep_size; 1: off)
    zero: dict = field(default_factory=dict, repr=False, compare=False)
    json: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, ds: dict) -> "DSSettings":
        """`ds` read: a resolved json (resolve_ds_config's), or a user's where only the ZeRO section matters
        (missing keys take DeepSpeed's defaults: stage 0, fp32, AdamW, nothing offloaded)."""
        zero = ds.get("zero_optimization") or {}
        return cls(stage=int(zero.get("stage", 0)), bf16=(ds.get("bf16") or {}).get("enabled") is True,
                   optimizer=str((ds.get("optimizer") or {}).get("type", "AdamW")),
                   offload_optimizer=_offloaded(zero, "offload_optimizer"),
                   offload_param=_offloaded(zero, "offload_param"), ep=ep_size_of(ds), zero=zero, json=ds)

    @property
    def muon(self) -> bool:
        return self.optimizer == "Muon"

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: bf16 where the json enables it, else fp32."""
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def bytes_per_param(self) -> int:
        return 2 if self.bf16 else 4


def _offloaded(zero: dict, key: str) -> bool:
    return (zero.get(key) or {}).get("device", "none") not in (None, "none")


def resolve_precision(model: ModelConfig) -> str:
    if model.precision != "auto":
        return model.precision
    return "bf16" if native_bf16() else "fp32"


def native_bf16() -> bool:
    """A GPU that computes in bf16 (Ampere and newer). `torch.cuda.is_bf16_supported()` alone also says yes for
    bf16 emulated through fp32 (V100, T4): slower than fp32 there, and the flash kernels refuse it."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        return torch.cuda.get_device_capability() >= (8, 0)


def resolve_ds_config(config: TrainConfig, world_size: int, ranks_per_node: Optional[int] = None) -> dict:
    """The user's json (ZeRO settings: config.parallel.deepspeed) plus everything the trainer decides from the
    batch and optimizer sections and the model's precision.

    A value the trainer owns may be absent or "auto" in the json; any other value that
    differs from what the flags resolve to is an error naming both.
    """
    path, batch, optim = config.parallel.deepspeed, config.batch, config.optim
    with open(path) as f:
        ds = json.load(f)
    precision = resolve_precision(config.model)
    owned: list[tuple[tuple[str, ...], Any, str]] = [
        (("train_micro_batch_size_per_gpu",), batch.micro_batch_size, "--micro_batch_size"),
        (("gradient_accumulation_steps",), batch.grad_accum, "--grad_accum"),
        (("train_batch_size",), batch.micro_batch_size * batch.grad_accum * world_size,
         "--micro_batch_size x --grad_accum x world size"),
        (("gradient_clipping",), optim.grad_clip, "--grad_clip"),
        (("bf16", "enabled"), precision == "bf16", "--precision"),
        (("fp16", "enabled"), False, "--precision (fp16 is not supported: use bf16)"),
        (("optimizer", "params", "lr"), optim.lr, "--lr"),
        (("optimizer", "params", "weight_decay"), optim.weight_decay, "--weight_decay"),
        (("optimizer", "params", "betas"), [optim.adam_beta1, optim.adam_beta2], "--adam_beta1/--adam_beta2"),
        (("optimizer", "params", "eps"), optim.adam_eps, "--adam_eps"),
    ]
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler': the trainer owns the LR schedule "
                          "(--lr, --warmup_ratio, --min_lr_ratio)")
    muon = optimizer_kind(optim.optimizer, ds, path) == "muon"
    if muon:
        owned += [(("optimizer", "params", "muon_lr"), optim.muon_lr, "--muon_lr"),
                  (("optimizer", "params", "momentum"), optim.muon_momentum, "--muon_momentum"),
                  (("optimizer", "params", "adam_lr"), optim.lr, "--lr")]
    for keys, value, flag in owned:
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current != "auto" and not _same(current, value):
            raise ConfigError(f"{path}: {'.'.join(keys)} = {current!r} contradicts {flag} (resolved to {value!r}); "
                              "remove it from the json or set it to \"auto\"")
        node[keys[-1]] = value
    ds["optimizer"]["type"] = "Muon" if muon else "AdamW"
    ds["optimizer"]["params"]["adam_w_mode"] = True
    expert_parallel_size(ds, config.parallel.expert_parallel, world_size, path)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if muon:
        _muon_zero(zero, path)
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    _zero_plus_plus(zero, world_size, local_world_size() if ranks_per_node is None else ranks_per_node, path)
    if precision == "bf16":  # skip steps whose gradients are not finite, as fp32 ZeRO does
        ds["bf16"].setdefault("check_grad_overflow", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _zero_plus_plus(zero: dict, world_size: int, ranks_per_node: int, path: str) -> None:
    """ZeRO++'s "auto" values (ds_configs/zero3pp.json). zero_hpz_partition_size: the ranks of a node (a
    secondary copy of the weights partitioned within each node, so the forward's and backward's all-gathers stay
    on the node's links), 1 (off) on one node, where the primary partition is within the node already.
    zero_quantized_weights / zero_quantized_gradients: on where CUDA is (DeepSpeed's QuantizerBuilder kernels
    are CUDA-only; a CPU has no build of them), else off."""
    if zero.get("zero_hpz_partition_size") == "auto":
        multi_node = 1 < ranks_per_node < world_size and world_size % ranks_per_node == 0
        zero["zero_hpz_partition_size"] = ranks_per_node if multi_node else 1
    hpz = zero.get("zero_hpz_partition_size", 1)
    if hpz > 1 and (zero.get("stage", 0) != 3 or world_size % hpz):
        raise ConfigError(f"{path}: zero_hpz_partition_size {hpz} needs ZeRO stage 3 and a world size it divides "
                          f"({world_size} ranks); set it to \"auto\" (the ranks of a node)")
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if zero.get(key) == "auto":
            zero[key] = torch.cuda.is_available()
        elif zero.get(key) and not torch.cuda.is_available():
            raise ConfigError(f"{path}: {key} needs CUDA (DeepSpeed's quantizer kernels); set it to \"auto\"")


def optimizer_kind(flag: str, ds: dict, path: str) -> str:
    """adamw or muon: --optimizer, or with `auto` the json's optimizer type (AdamW when it names none)."""
    named = str(ds.get("optimizer", {}).get("type", "AdamW")).lower()
    if named not in ("adamw", "adam", "muon"):
        raise ConfigError(f"{path}: optimizer type {named!r} is not supported; use AdamW or Muon (--optimizer)")
    named = "adamw" if named == "adam" else named
    if flag != "auto" and "type" in ds.get("optimizer", {}) and named != flag:
        raise ConfigError(f"{path}: optimizer type {named!r} contradicts --optimizer {flag}; remove the type from "
                          "the json or change the flag")
    return named if flag == "auto" else flag


def _muon_zero(zero: dict, path: str) -> None:
    """DeepSpeed's ZeRO-3 Muon orthogonalizes gathered whole-matrix gradients and can neither reduce-scatter them
    nor send them through ZeRO++'s quantized all-to-all (stage3.py raises for both): both turned off here unless
    the json asks for them."""
    if zero.get("zero_quantized_gradients") is True:
        raise ConfigError(f"{path}: DeepSpeed's Muon cannot use zero_quantized_gradients (an all-to-all): set it to "
                          "false or \"auto\"")
    zero["zero_quantized_gradients"] = False
    if zero.get("stage", 0) == 3:
        if zero.get("reduce_scatter") is True:
            raise ConfigError(f"{path}: DeepSpeed's ZeRO-3 Muon cannot reduce-scatter: remove "
                              "zero_optimization.reduce_scatter or set it to false")
        zero["reduce_scatter"] = False


@dataclass(frozen=True)
class OptimizerChoice:
    """Which optimizer a run gets (settle_optimizer's answer): its description for the run's log, what the json's
    optimizer params gain for it (`params`: torch's AdamW instead of FusedAdam), and whether it is DeepSpeed's
    Muon. Nothing is written until the caller takes `applied`."""

    description: str
    params: dict = field(default_factory=dict)
    muon: bool = False

    def applied(self, ds: dict) -> dict:
        """`ds` with this choice's optimizer params (a new dict; `ds` is left as it was)."""
        optimizer = ds.get("optimizer", {})
        return {**ds, "optimizer": {**optimizer, "params": {**optimizer.get("params", {}), **self.params}}}


def settle_optimizer(ds: DSSettings) -> OptimizerChoice:
    """Which AdamW the run gets, decided before deepspeed.initialize (which would fail there): DeepSpeed's
    FusedAdam where its op loads (prebuilt, or JIT-built with the machine's compiler: nvcc on CUDA, gcc on a
    CPU), else PyTorch's own AdamW (fused on a GPU), said once. ZeRO-Offload keeps DeepSpeed's CPU Adam (it
    needs no nvcc). The json is not changed: the answer's `applied` gives the json to initialize with."""
    params = ds.json["optimizer"]["params"]
    from ds_vlm.runtime.distributed import clear_stale_build_lock

    if params.get("torch_adam") or ds.offload_optimizer:
        if ds.offload_optimizer:
            clear_stale_build_lock("cpu_adam")  # DeepSpeedCPUAdam is JIT-built inside deepspeed.initialize
        return OptimizerChoice("torch AdamW" if params.get("torch_adam") else "DeepSpeed CPU Adam (ZeRO-Offload)")
    from deepspeed.accelerator import get_accelerator

    try:
        builder = get_accelerator().create_op_builder("FusedAdamBuilder")
        clear_stale_build_lock(builder.name)
        builder.load(verbose=False)
        return OptimizerChoice("DeepSpeed FusedAdam")
    except Exception as err:  # no nvcc, a CUDA toolkit that does not match torch's, no compiler, a read-only cache
        fused = torch.cuda.is_available()
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        say_once(f"DeepSpeed's FusedAdam op cannot be built here ({type(err).__name__}: {first}); using "
                  f"torch.optim.AdamW{' (fused)' if fused else ''} instead: the same update")
        return OptimizerChoice(f"torch AdamW{' (fused)' if fused else ''} (FusedAdam could not be built)",
                               {"torch_adam": True, **({"fused": True} if fused else {})})


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b
