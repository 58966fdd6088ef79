"""The optimizer's parameter groups (per part learning rates, no decay on norms and biases) and the LR schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ds_vlm.config import ConfigError, OptimConfig

if TYPE_CHECKING:
    from ds_vlm.train.ds_config import DSSettings, OptimizerChoice


def param_groups(groups: dict[str, list], config: OptimConfig, muon: bool = False) -> list[dict]:
    """Optimizer groups by (learning rate, weight decay): parts with the same lr share a group (named e.g.
    'projector+llm'); norms, biases and other 1-d tensors get no decay (a '_no_decay' group), unless the
    weight decay is 0 anyway: then they stay in their part's group. Fewer groups make ZeRO's step cheaper
    (each group is a flat buffer of its own: its own all-gather after the step; measured on the tiny model,
    ZeRO-2: 4 groups ~13 ms a step, 2 groups ~6 ms).

    With `muon`, the parameters `muon_flags` marked are grouped apart at --muon_lr times the part's lr / --lr:
    DeepSpeed splits every group it is given into a Muon and an AdamW half (naming them NAME-muon-params and
    NAME-adam-params) and gives both halves the group's lr, so a group must be all Muon or all AdamW for each
    to get its own lr."""
    lrs = {"vision": config.vision_lr or config.lr, "projector": config.projector_lr or config.lr, "llm": config.lr}
    merged: dict[tuple[float, float, bool], dict] = {}
    for part, named in groups.items():
        trainable = [(n, p) for n, p in named if p.requires_grad]
        for decay in (True, False):
            for on_muon in (False, True) if muon else (False,):
                params = [p for n, p in trainable if _decays(n, p) == decay and _on_muon(p, muon) == on_muon]
                if not params:
                    continue
                lr = lrs[part] * (config.muon_lr / config.lr if on_muon else 1.0)
                weight_decay = config.weight_decay if decay else 0.0
                group = merged.setdefault((lr, weight_decay, on_muon), {
                    "params": [], "lr": lr, "parts": [], "weight_decay": weight_decay,
                    "suffix": "_no_decay" if config.weight_decay and not decay else ""})
                group["params"] += params
                group["parts"] += [part] if part not in group["parts"] else []
    if not merged:
        raise ConfigError("nothing to train: --train_llm, --train_projector and --train_vision are all off")
    out = []
    for group in merged.values():
        parts, suffix = group.pop("parts"), group.pop("suffix")
        out.append({**group, "name": "+".join(parts) + suffix})
    return out


def muon_flags(model: torch.nn.Module) -> dict[str, bool]:
    """Which parameters DeepSpeed's Muon updates, by its own rule (deepspeed.set_optimizer_flags, which
    deepspeed.initialize runs again on the same model): matrices (2 or more dims as a layer; ZeRO-3's ds_shape)
    whose name holds neither 'embed' nor 'lm_head'. So the attention, MLP and expert projections of both towers
    and the projector go to Muon; the token embedding, the LM head, norms, biases, and the vision tower's patch
    embedding (a Conv3d) and position embedding to AdamW. Sets `param.use_muon`; name -> flag, in
    named_parameters' order."""
    from types import SimpleNamespace

    import deepspeed

    deepspeed.set_optimizer_flags(SimpleNamespace(optimizer_name="muon", optimizer_params={}), model)
    return {name: p.use_muon for name, p in model.named_parameters()}


def settle_optimizer_for(ds: DSSettings, model: torch.nn.Module) -> OptimizerChoice:
    """settle_optimizer (which AdamW this machine gets, for the DSSettings `ds`), and with Muon `muon_flags` on the
    model the engine gets (its parameters' `use_muon`, which param_groups reads): an OptimizerChoice whose
    description names both."""
    from dataclasses import replace

    from ds_vlm.train.ds_config import settle_optimizer

    adam = settle_optimizer(ds)
    if not ds.muon:
        return adam
    muon_flags(model)
    tags = [p.use_muon for p in model.parameters() if p.requires_grad]
    return replace(adam, description=f"DeepSpeed Muon on {sum(tags)} of {len(tags)} trained tensors, "
                                     f"{adam.description} on the rest", muon=True)


def _on_muon(param: torch.nn.Parameter, muon: bool) -> bool:
    return muon and getattr(param, "use_muon", False)


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
