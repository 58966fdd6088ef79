"""LoRA (--lora_rank R) through peft, on the parts --train_llm / --train_vision / --train_projector choose.

Inside a trained part, the linear layers that --lora_targets names get LoRA adapters and their weights stay
frozen; a trained part with no such layer (the projector, by default) trains fully. Checkpoints hold only
what trains (adapters, fully trained parts, their optimizer state); the run writes OUTPUT_DIR/hf/ (LoRA
merged into the weights: plain `from_pretrained`) and OUTPUT_DIR/adapter/ (peft's format: the adapters and
the fully trained parts as `modules_to_save`, for `PeftModel.from_pretrained(base, ...)`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ds_vlm.config import ConfigError, ModelConfig

# The language tower's attention and MLP projections (Qwen2/2.5/3-VL, Qwen3-VL-MoE's shared names, Llama), and
# Qwen3.5's Gated DeltaNet projections (q/k/v fused, the output gate z, the decay a and the write strength b)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")


def target_modules(model, parts, config: ModelConfig) -> list[str]:
    """Full names of the linear layers that get LoRA: in the parts that train, those --lora_targets names.
    `default`: the language tower's attention and MLP projections; `all-linear`: every linear layer of a
    trained part (never the LM head); otherwise comma-separated module names (a name's last component) or
    regular expressions matched against full names."""
    head = model.get_output_embeddings()
    spec = config.lora_targets
    trained = [m for m in (*parts.vision, *parts.projector, *parts.llm) if any(p.requires_grad for p in m.parameters())]
    if spec == "default":
        trained = [m for m in parts.llm if any(p.requires_grad for p in m.parameters())]
    names = {id(m): n for n, m in model.named_modules()}
    chosen = []
    for root in trained:
        for sub_name, module in root.named_modules():
            if not isinstance(module, torch.nn.Linear) or module is head:
                continue
            full = names[id(module)]
            last = full.rsplit(".", 1)[-1]
            if spec == "default":
                hit = last in DEFAULT_TARGETS
            elif spec == "all-linear":
                hit = True
            else:
                hit = any(last == item or re.fullmatch(item, full) for item in spec.split(","))
            if hit and (any(p.requires_grad for p in module.parameters()) or is_quantized(module)):
                chosen.append(full)
    if not chosen:
        raise ConfigError(f"--lora_targets {spec!r} matches no linear layer of the parts that train "
                          "(--train_llm / --train_vision / --train_projector)")
    return sorted(set(chosen))


def fully_trained(model, parts, targets: list[str]) -> list[str]:
    """Names of the trained modules of the parts that hold no LoRA target: those parts train fully (peft's
    `modules_to_save`). A part with a target (the language tower, by default) trains through LoRA only: its
    other weights, the LM head and the embeddings included, stay frozen."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for part in ([*parts.vision_blocks, *parts.vision], parts.projector, parts.llm):
        roots = [names[id(m)] for m in part]
        if any(t == r or t.startswith(r + ".") for t in targets for r in roots):
            continue
        for module in part:
            # peft wraps modules, not containers: a ModuleList (Qwen3-VL's deepstack mergers) by its members
            container = isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict))
            for member in (module.children() if container else [module]):
                params = list(member.parameters())
                name = names[id(member)]
                if params and all(p.requires_grad for p in params) and not any(
                        name == kept or name.startswith(kept + ".") for kept in out):
                    out.append(name)
    return out


def lora_config(config: ModelConfig, targets: list[str], modules_to_save: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, modules_to_save=modules_to_save or None, bias="none",
                      base_model_name_or_path=config.path)


def apply_lora(model, adapter, config: ModelConfig):
    """(peft model, its LoraConfig). Call after set_trainable: the trainable flags say which parts train."""
    from peft import get_peft_model

    parts = adapter.parts(model)
    targets = target_modules(model, parts, config)
    full = fully_trained(model, parts, targets)
    # modules_to_save goes into the adapter's config only: peft would copy those modules, which ZeRO-3 has
    # partitioned already; they train in place here
    peft_config = lora_config(config, targets, [])
    peft_model = get_peft_model(model, peft_config)
    base = peft_model.get_base_model()
    for name in full:
        base.get_submodule(name).requires_grad_(True)
    if any(n == r or n.startswith(r + ".") for n in full for r in _names(model, parts.projector)):
        for param in parts.projector_parameters:  # they train with their projector, which trains fully
            param.requires_grad_(True)
    return peft_model, lora_config(config, targets, full)


def _names(model, modules) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in modules if id(m) in names]


def is_quantized(module: torch.nn.Module) -> bool:
    """A layer whose weight is stored quantized (QLoRA's 4-bit bitsandbytes weights: integers plus a
    `quant_state`); it cannot train itself, LoRA trains beside it."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.is_floating_point() and hasattr(weight, "quant_state")


def _dequantize(weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)


def dequantized_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the model's state dict) with every quantized weight replaced by its full-precision value (in
    its compute dtype) and the quantization's own entries (absmax, quant_map, quant_state...) left out: what
    a plain model of the same config loads."""
    quantized = {f"{name}.weight": module.weight for name, module in model.named_modules() if is_quantized(module)}
    if not quantized:
        return state
    out = {}
    for key, value in state.items():
        if key in quantized:
            weight = quantized[key]
            dtype = getattr(weight.quant_state, "dtype", None) or torch.bfloat16
            out[key] = _dequantize(weight).to("cpu", dtype)
        elif not any(key.startswith(name + ".") for name in quantized):
            out[key] = value
    return out


def merged_state_dict(state: dict[str, torch.Tensor], peft_config) -> dict[str, torch.Tensor]:
    """The peft model's full state dict (quantized weights dequantized first: `dequantized_state_dict`) -> the
    plain model's, LoRA merged: W + B A x alpha / r."""
    scale = peft_config.lora_alpha / peft_config.r
    out = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if not value.is_floating_point():
            raise ValueError(f"{key} is stored as {value.dtype}: dequantize the state dict before merging LoRA")
        plain = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if ".base_layer." in key and key.endswith(".weight"):
            module = key[:key.index(".base_layer.")]
            a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
            value = (value.float() + (b.float() @ a.float()) * scale).to(value.dtype)
        out[plain] = value
    return out


def save_adapter(state: dict[str, torch.Tensor], peft_config, out_dir: str) -> None:
    """peft's adapter format: adapter_config.json and the adapters and fully trained modules' weights under the
    names peft saves them with."""
    from safetensors.torch import save_file

    keep = {}
    for key, value in state.items():
        plain = key.removeprefix("base_model.model.")
        if ".lora_A." in key or ".lora_B." in key:
            keep[key.replace(".default.", ".")] = value
        elif any(plain.startswith(module + ".") for module in peft_config.modules_to_save or ()):
            keep[key] = value
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in keep.items()}, str(Path(out_dir) / "adapter_model.safetensors"))
    peft_config.save_pretrained(out_dir)


def describe(peft_config) -> dict:
    """What a checkpoint records to rebuild the adapter's config offline."""
    return {"r": peft_config.r, "lora_alpha": peft_config.lora_alpha, "lora_dropout": peft_config.lora_dropout,
            "target_modules": sorted(peft_config.target_modules),
            "modules_to_save": list(peft_config.modules_to_save or []),
            "base_model_name_or_path": peft_config.base_model_name_or_path}


def from_description(described: dict):
    from peft import LoraConfig

    return LoraConfig(r=described["r"], lora_alpha=described["lora_alpha"], lora_dropout=described["lora_dropout"],
                      target_modules=described["target_modules"], modules_to_save=described["modules_to_save"] or None,
                      bias="none", base_model_name_or_path=described["base_model_name_or_path"])
