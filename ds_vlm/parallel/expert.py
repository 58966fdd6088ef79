"""Expert parallelism through DeepSpeed's AutoEP: the experts of each MoE block split over groups of
--expert_parallel ranks (tokens exchanged all-to-all), everything else (the vision tower, attention, the
router, norms, embeddings) data-parallel under ZeRO as before.

AutoEP reads the `expert_parallel` section of the DeepSpeed json. `--expert_parallel N` writes it; a json that
already has one is read as well (its `autoep_size` must agree with the flag unless the flag is left at 1). What
the section needs to know about the model comes from the family's adapter (`Adapter.autoep_preset`: the
AutoEP preset whose MoE block layout the family's text layers share) and the model's text config:

    qwen3_vl_moe   preset qwen3_moe (AutoEP has no Qwen3-VL-MoE preset; the text blocks have the same fused
                   gate_up_proj / down_proj experts and top-k router), the layers under model.language_model
    qwen3_5_moe    preset qwen3_5_moe (written for the qwen3_5_moe_text backbone), the same pattern

Found on 2 CPU ranks (gloo, torch 2.14.1, deepspeed 0.19.8): AutoEP runs there with `use_grouped_mm` off
(set here where CUDA is missing); losses equal EP 1 to fp32 rounding. Not yet here: the router's load-balancing
loss (AutoEP's qwen3_moe adapter retargets transformers' router-logits recorder for Qwen3-MoE classes only, so
`output_router_logits` finds no logits: the trainer does not ask for them), an HF export of the sharded
experts (refused with EP > 1: `--export_hf false`) and resuming at another EP size (refused by the resume's
exactness keys; the same size resumes with the uninterrupted losses).
"""

from __future__ import annotations

from typing import Optional

import torch

from ds_vlm.config import ConfigError

LAYERS = r"model\.language_model\.layers\.\d+\.mlp"  # the text layers' MLP in the Qwen VL layouts


def expert_parallel_size(ds: dict, flag: int, world_size: int, path: str) -> int:
    """The EP size of the run (1: off), from --expert_parallel and the json's section; writes the section's
    `enabled` and `autoep_size` into `ds`."""
    section = ds.get("expert_parallel")
    in_json = int(section.get("autoep_size", 1)) if section and section.get("enabled", True) else 1
    if flag > 1 and in_json > 1 and flag != in_json:
        raise ConfigError(f"{path}: expert_parallel.autoep_size = {in_json} contradicts --expert_parallel {flag}")
    size = flag if flag > 1 else in_json
    if size <= 1:
        return 1
    if world_size % size:
        raise ConfigError(f"--expert_parallel {size}: the world size {world_size} is not a multiple of it")
    ds["expert_parallel"] = {**(section or {}), "enabled": True, "autoep_size": size}
    return size


def ep_size_of(ds: dict) -> int:
    """The EP size a resolved DeepSpeed json gives (1: off)."""
    section = ds.get("expert_parallel") or {}
    return int(section.get("autoep_size", 1)) if section.get("enabled") else 1


def fill_autoep_section(ds: dict, adapter, model_config, export_hf: bool) -> Optional[dict]:
    """The model's part of the `expert_parallel` section (preset, layer pattern, top-k), where EP is on; the
    json's own values win. Refuses families without MoE blocks, and an HF export (not written yet)."""
    section = ds.get("expert_parallel")
    if not section or not section.get("enabled"):
        return None
    if export_hf:
        raise ConfigError("--expert_parallel: the HF export of experts split over ranks is not written yet: pass "
                          "--export_hf false (checkpoints are saved as usual)")
    preset = getattr(adapter, "autoep_preset", None)
    if preset is None:
        raise ConfigError(f"--expert_parallel: {adapter.family} has no MoE blocks (expert parallelism is for "
                          "qwen3_vl_moe and qwen3_5_moe)")
    if adapter.router_aux_loss_coef(model_config):
        raise ConfigError(f"--expert_parallel with the router's auxiliary loss is not supported yet: AutoEP's hooks do "
                          f"not record {adapter.family}'s router logits, so transformers' aux loss gets none; set "
                          "output_router_logits to false in the model's config.json, or train without "
                          "--expert_parallel")
    text = model_config.get_text_config()
    model_part = {"preset_model": preset, "moe_layer_pattern": LAYERS, "top_k": text.num_experts_per_tok,
                  "use_grouped_mm": torch.cuda.is_available()}
    ds["expert_parallel"] = {**model_part, **section}
    return ds["expert_parallel"]
