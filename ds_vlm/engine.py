"""DeepSpeed setup and the optimizer step: ds config, model loading, parameter groups, loss."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .attention import resolve_attention
from .console import say_once
from .config import ConfigError, TrainConfig
from .models import Adapter, adapter_for

# --------------------------------------------------------------------------- ds config


def resolve_precision(config: TrainConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def resolve_ds_config(config: TrainConfig, world_size: int) -> dict:
    """The user's json (ZeRO settings) plus everything the trainer decides.

    A value the trainer owns may be absent or "auto" in the json; any other value that
    differs from what the flags resolve to is an error naming both.
    """
    path = config.deepspeed
    with open(path) as f:
        ds = json.load(f)
    precision = resolve_precision(config)
    owned: list[tuple[tuple[str, ...], Any, str]] = [
        (("train_micro_batch_size_per_gpu",), config.micro_batch_size, "--micro_batch_size"),
        (("gradient_accumulation_steps",), config.grad_accum, "--grad_accum"),
        (("train_batch_size",), config.micro_batch_size * config.grad_accum * world_size,
         "--micro_batch_size x --grad_accum x world size"),
        (("gradient_clipping",), config.grad_clip, "--grad_clip"),
        (("bf16", "enabled"), precision == "bf16", "--precision"),
        (("fp16", "enabled"), False, "--precision (fp16 is not supported: use bf16)"),
        (("optimizer", "params", "lr"), config.lr, "--lr"),
        (("optimizer", "params", "weight_decay"), config.weight_decay, "--weight_decay"),
        (("optimizer", "params", "betas"), [config.adam_beta1, config.adam_beta2], "--adam_beta1/--adam_beta2"),
        (("optimizer", "params", "eps"), config.adam_eps, "--adam_eps"),
    ]
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler': the trainer owns the LR schedule "
                          "(--lr, --warmup_ratio, --min_lr_ratio)")
    optimizer_type = ds.get("optimizer", {}).get("type", "AdamW")
    if optimizer_type.lower() not in ("adamw", "adam"):
        raise ConfigError(f"{path}: optimizer type {optimizer_type!r} is not supported; the trainer uses AdamW")
    for keys, value, flag in owned:
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current != "auto" and not _same(current, value):
            raise ConfigError(f"{path}: {'.'.join(keys)} = {current!r} contradicts {flag} (resolved to {value!r}); "
                              "remove it from the json or set it to \"auto\"")
        node[keys[-1]] = value
    ds["optimizer"]["type"] = "AdamW"
    ds["optimizer"]["params"]["adam_w_mode"] = True
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if precision == "bf16":  # skip steps whose gradients are not finite, as fp32 ZeRO does
        ds["bf16"].setdefault("check_grad_overflow", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def settle_optimizer(ds: dict) -> str:
    """Which AdamW the run gets, decided before deepspeed.initialize (which would fail there): DeepSpeed's
    FusedAdam where its op loads (prebuilt, or JIT-built with the machine's compiler: nvcc on CUDA, gcc on a
    CPU), else PyTorch's own AdamW (fused on a GPU), said once. ZeRO-Offload keeps DeepSpeed's CPU Adam (it
    needs no nvcc). Returns a short description for the run's log."""
    params = ds["optimizer"]["params"]
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    if params.get("torch_adam") or offload:
        return "torch AdamW" if params.get("torch_adam") else "DeepSpeed CPU Adam (ZeRO-Offload)"
    from deepspeed.accelerator import get_accelerator

    try:
        get_accelerator().create_op_builder("FusedAdamBuilder").load(verbose=False)
        return "DeepSpeed FusedAdam"
    except Exception as err:  # no nvcc, a CUDA toolkit that does not match torch's, no compiler, a read-only cache
        params["torch_adam"] = True
        fused = torch.cuda.is_available()
        if fused:
            params["fused"] = True
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        say_once(f"DeepSpeed's FusedAdam op cannot be built here ({type(err).__name__}: {first}); using "
                  f"torch.optim.AdamW{' (fused)' if fused else ''} instead: the same update")
        return f"torch AdamW{' (fused)' if fused else ''} (FusedAdam could not be built)"


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


# --------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    adapter: Adapter
    hf_ds_config: Any  # must stay alive while ZeRO-3 models are created


def load_model(config: TrainConfig, ds_config: dict, sequence_parallel=None) -> LoadedModel:
    """Load model + processor; under ZeRO-3 the weights arrive already partitioned. With sequence parallelism
    the text model's attention is the Ulysses wrapper around the chosen kernel."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations import HfDeepSpeedConfig

    model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    adapter = adapter_for(model_config.model_type)
    # Keeping this object referenced is what makes from_pretrained partition under ZeRO-3.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage", 0) == 3 else None
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    attention = resolve_attention(config.attn_implementation, config.packing)
    if sequence_parallel is not None:
        attention = sequence_parallel.attn_implementation(attention, model_config)
    quantization = quantization_config(config, adapter, dtype, hf_ds_config is not None)
    # 4-bit weights are quantized as they reach the GPU: load them onto this rank's own
    quantized = {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}} \
        if quantization else {}
    with adapter.loading(zero3=hf_ds_config is not None):
        model = AutoModelForImageTextToText.from_pretrained(
            config.model, dtype=dtype, trust_remote_code=config.trust_remote_code, attn_implementation=attention,
            **quantized)
    adapter.prepare(model)
    processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    getattr(model.config, "text_config", model.config).use_cache = False  # no KV cache while training
    return LoadedModel(model, processor, adapter, hf_ds_config)


def quantization_config(config: TrainConfig, adapter: Adapter, dtype, zero3: bool):
    """--lora_bits 4 (QLoRA): the language tower's frozen linear weights in 4-bit NF4 through bitsandbytes; the
    vision tower, projector and LM head stay in `dtype`. Refused where it cannot run."""
    if not config.lora_bits:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--lora_bits 4 needs the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        raise ConfigError("--lora_bits 4 needs a CUDA GPU (bitsandbytes' 4-bit kernels); use --lora_bits 0 here")
    if zero3:
        raise ConfigError("--lora_bits 4 does not work with ZeRO-3 (4-bit weights cannot be partitioned); use "
                          "ds_configs/zero2.json, or --lora_bits 0")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(adapter.keep_full_precision))


def set_trainable(model: torch.nn.Module, adapter: Adapter, config: TrainConfig) -> dict[str, list]:
    """Freeze everything, then unfreeze the chosen parts; returns {part: [(name, param)]}. Quantized weights
    (QLoRA's 4-bit ones, stored as integers) stay frozen inside a trained part: LoRA trains beside them."""
    parts = adapter.parts(model)
    model.requires_grad_(False)
    chosen = []
    if config.train_llm:
        chosen += parts.llm
    if config.train_projector:
        chosen += parts.projector
    blocks = config.vision_blocks_to_train
    if blocks == -1:
        chosen += parts.vision
    elif blocks:
        if blocks > len(parts.vision_blocks):
            raise ConfigError(f"asked to train the last {blocks} vision blocks; the model has {len(parts.vision_blocks)}")
        chosen += list(parts.vision_blocks)[-blocks:]
    for module in chosen:
        for param in module.parameters():
            if param.is_floating_point():
                param.requires_grad_(True)
    return part_parameters(model, adapter)


def part_parameters(model: torch.nn.Module, adapter: Adapter) -> dict[str, list]:
    """{part: [(name, param)]} for every parameter of the model (LoRA's included, once applied)."""
    parts = adapter.parts(model)
    owner = {}
    for part, modules in (("vision", parts.vision), ("projector", parts.projector), ("llm", parts.llm)):
        for module in modules:
            for param in module.parameters():
                owner.setdefault(id(param), part)
    groups: dict[str, list] = {"vision": [], "projector": [], "llm": []}
    for name, param in model.named_parameters():
        if id(param) not in owner:
            raise RuntimeError(f"adapter {adapter.family}: parameter {name} belongs to no part")
        groups[owner[id(param)]].append((name, param))
    return groups


def enable_checkpointing(model: torch.nn.Module, adapter: Adapter, config: TrainConfig) -> None:
    """Non-reentrant activation checkpointing on the language tower (--gradient_checkpointing) and on
    the vision tower's blocks (--vision_checkpointing).

    The token embeddings' output is made to require grad so that frozen embeddings never cut the
    checkpointed graph. Only the token embeddings: transformers' `enable_input_require_grads()` also
    hooks the vision tower's patch embedding (Qwen2-VL, Qwen2.5-VL, CLIP), which makes a frozen vision
    tower build a graph and keep all its activations for a backward that never reaches a parameter.
    """
    parts = adapter.parts(model)
    if config.gradient_checkpointing:
        _checkpoint_blocks(parts.llm_decoder)
        model.get_input_embeddings().register_forward_hook(_output_requires_grad)
    if config.vision_checkpointing:
        if parts.vision_encoder is None:
            raise ConfigError(f"--vision_checkpointing: the {adapter.family} adapter names no vision encoder")
        _checkpoint_blocks(parts.vision_encoder)


def _checkpoint_blocks(module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _output_requires_grad(module, inputs, output):
    output.requires_grad_(True)


def param_groups(groups: dict[str, list], config: TrainConfig) -> list[dict]:
    """Optimizer groups by (learning rate, decay): parts with the same lr share a group (named e.g.
    'projector+llm'); norms, biases and other 1-d tensors get no decay. Fewer groups make ZeRO's
    step cheaper (measured: 4 groups cost ZeRO-2 ~13 ms a step on the tiny model, 2 groups ~6 ms)."""
    lrs = {"vision": config.vision_lr or config.lr, "projector": config.projector_lr or config.lr, "llm": config.lr}
    merged: dict[tuple[float, bool], dict] = {}
    for part, named in groups.items():
        trainable = [(n, p) for n, p in named if p.requires_grad]
        for decay in (True, False):
            params = [p for n, p in trainable if _decays(n, p) == decay]
            if params:
                group = merged.setdefault((lrs[part], decay), {"params": [], "lr": lrs[part], "parts": [],
                                                               "weight_decay": config.weight_decay if decay else 0.0})
                group["params"] += params
                group["parts"].append(part)
    if not merged:
        raise ConfigError("nothing to train: --train_llm, --train_projector and --train_vision are all off")
    out = []
    for (_, decay), group in merged.items():
        parts = group.pop("parts")
        out.append({**group, "name": "+".join(parts) + ("" if decay else "_no_decay")})
    return out


def optimizer_groups(engine) -> list[dict]:
    """Each parameter group as the DeepSpeed optimizer holds it (for run_config.json): name, current lr,
    base lr (before the schedule's factor) and weight decay."""
    return [{"name": g.get("name"), "lr": g["lr"], "initial_lr": g.get("initial_lr"),
             "weight_decay": g["weight_decay"]} for g in engine.optimizer.param_groups]


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned params keep their shape here
    return len(shape) >= 2 and "norm" not in name.lower()


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup over ceil(ratio * total) steps, then cosine decay to min_lr_ratio."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
