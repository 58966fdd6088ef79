"""Expert parallelism through DeepSpeed's AutoEP: the experts of each MoE block split over groups of
--expert_parallel ranks (tokens exchanged all-to-all), everything else (the vision tower, attention, the
router, norms, embeddings) data-parallel under ZeRO as before.

AutoEP reads the `expert_parallel` section of the DeepSpeed json. `--expert_parallel N` writes it; a json that
already has one is read as well (its `autoep_size` must agree with the flag unless the flag is left at 1). What
the section needs to know about the model comes from the family's adapter (`Adapter.autoep_preset`: the
AutoEP preset whose MoE block layout the family's text layers share) and the model's text config:

    qwen3_vl_moe   preset qwen3_moe (AutoEP has no Qwen3-VL-MoE preset; the text blocks have the same fused
                   gate_up_proj / down_proj experts and top-k router), the layers under model.language_model
    qwen3_5_moe    preset qwen3_moe as well: AutoEP's own qwen3_5_moe preset refuses the VLM's model_type
                   (`qwen3_5_moe`; it validates the top-level config and asks for the `qwen3_5_moe_text`
                   backbone's), and qwen3_moe's is the same layout field by field (fused experts, top-k softmax
                   router with normalized top-k, a shared expert behind a sigmoid gate); the same pattern

Found on 2 CPU ranks (gloo, torch 2.14.1, deepspeed 0.19.8, transformers 5.24.0; tests/dist/test_expert.py): AutoEP
runs there with `use_grouped_mm` off (set here where CUDA is missing); for both families the losses and the
router's load-balancing loss equal EP 1's to fp32 rounding (1e-5 abs over 4 steps).
On 4 CPU ranks (qwen3_5_moe, ZeRO-2, by hand, not in the suite): EP 2 (two EP groups) and EP 4 equal EP 1
within 1e-6 (loss and aux loss, 4 steps), their HF exports within 3e-6, and EP 4's step-2 checkpoint resumes
at EP 2 with the uninterrupted losses.

- The router's aux loss: AutoEP replaces the whole MoE block, so transformers' recorder (which names its own
  router class) finds no logits, and AutoEP's retargeting covers Qwen3-MoE/Qwen2-MoE class names only. The patch
  `autoep_router_logits_recorder` (ds_vlm/patches/deepspeed_autoep.py) points it at AutoEP's `router.gate` (the
  raw logits, as the transformers router's output 0): `record_router_logits`, after deepspeed.initialize.
- The HF export (`hf_state_of_autoep`): each layer's local experts all-gathered over its EP group and written
  back as `experts.gate_up_proj` [E, 2 x ffn, hidden] / `experts.down_proj`, the router as `gate.weight`, the
  shared expert under transformers' names; it reloads with from_pretrained. Under ZeRO-3 DeepSpeed's
  consolidation refuses AutoEP (the experts are partitioned over their expert-data-parallel group), so
  checkpoint/hf.py gathers parameter by parameter, each over its own group. Refused with LoRA (the merge does
  not know AutoEP's layers): `--export_hf false` there.
- Resuming at another EP size goes through DeepSpeed's universal format, which reshards AutoEP's experts
  (checkpoint/resume.py). A checkpoint of AutoEP's layout resumed at EP 1 runs AutoEP at size 1
  (`keep_autoep_layout`: every rank holds all the experts under AutoEP's names). Refused: a checkpoint saved
  without EP (transformers' fused layout) resumed at EP > 1. The universal format keeps parameter names (its
  zero/ folders could be renamed: experts.gate_up_proj split into AutoEP's experts.w1/w3, down_proj -> w2), but
  AutoEP's engine puts the experts in optimizer groups of their own, and DeepSpeed 0.19.8's universal loader
  pairs the live groups with the checkpoint's by position (base_optimizer.load_hp_checkpoint_state_from_
  checkpoint_dir zips them): the experts' groups would silently get no optimizer state, and the LR schedule's
  state (the old group count) fails at the first step (tried). Start such an EP run from the HF export instead.
  Also refused: ZeRO-0 at another size (no universal format there).
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


def keep_autoep_layout(ds: dict) -> None:
    """A run at EP 1 resuming a checkpoint of AutoEP's layout (checkpoint/resume.py, holds_autoep_layers) runs
    AutoEP at size 1: every rank holds all the experts, under the names and shapes the checkpoint has them."""
    if not (ds.get("expert_parallel") or {}).get("enabled"):
        ds["expert_parallel"] = {**(ds.get("expert_parallel") or {}), "enabled": True, "autoep_size": 1}


def ep_size_of(ds: dict) -> int:
    """The EP size a resolved DeepSpeed json gives (1: off)."""
    section = ds.get("expert_parallel") or {}
    return int(section.get("autoep_size", 1)) if section.get("enabled") else 1


def fill_autoep_section(ds: dict, adapter, model_config, export_hf: bool, lora: bool = False) -> Optional[dict]:
    """The model's part of the `expert_parallel` section (preset, layer pattern, top-k), where EP is on; the
    json's own values win. Refuses families without MoE blocks, and an HF export with LoRA (its merge does not
    know AutoEP's layers)."""
    section = ds.get("expert_parallel")
    if not section or not section.get("enabled"):
        return None
    if export_hf and lora:
        raise ConfigError("--expert_parallel with LoRA: the HF export's merge does not know AutoEP's layers: pass "
                          "--export_hf false (checkpoints are saved as usual)")
    preset = getattr(adapter, "autoep_preset", None)
    if preset is None:
        raise ConfigError(f"--expert_parallel: {adapter.family} has no MoE blocks (expert parallelism is for "
                          "qwen3_vl_moe and qwen3_5_moe)")
    text = model_config.get_text_config()
    model_part = {"preset_model": preset, "moe_layer_pattern": LAYERS, "top_k": text.num_experts_per_tok,
                  "use_grouped_mm": torch.cuda.is_available()}
    ds["expert_parallel"] = {**model_part, **section}
    return ds["expert_parallel"]


def record_router_logits(model, adapter, ds: dict) -> None:
    """Where the config asks for the router's aux loss: transformers' router-logits recorders pointed at AutoEP's
    router gates (the patch `autoep_router_logits_recorder`), so the aux loss sees the logits it sees at EP 1."""
    from ds_vlm.patches.deepspeed_autoep import record_router_logits_of_autoep

    if (ds.get("expert_parallel") or {}).get("enabled") and adapter.router_aux_loss_coef(model.config):
        if not record_router_logits_of_autoep(model):
            raise ConfigError(f"--expert_parallel: no router-logits recorder of {adapter.family} to point at AutoEP's "
                              "routers; set output_router_logits to false in the model's config.json")


def autoep_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every AutoEP layer of `model`, in module order."""
    return [(name, m) for name, m in model.named_modules() if getattr(m, "_is_autoep_layer", False)]


def hf_state_of_autoep(model, state: Optional[dict]) -> Optional[dict]:
    """All ranks (collective over each layer's EP group): `state` (rank 0's state dict of `model`, None elsewhere)
    with every AutoEP layer written back in the transformers layout: the local experts' w1 (gate), w3 (up) and w2
    (down) gathered whole from the EP group into `experts.gate_up_proj` [E, 2 x ffn, hidden] and
    `experts.down_proj` [E, hidden, ffn], the router as `gate.weight`, the shared expert and its gate under
    their transformers names (`shared_expert.*`, `shared_expert_gate.weight`)."""
    import deepspeed

    from ds_vlm.runtime import distributed as comm

    for name, layer in autoep_layers(model):
        experts = layer.experts
        whole = []
        for w in (experts.w1, experts.w3, experts.w2):
            with deepspeed.zero.GatheredParameters([w], enabled=hasattr(w, "ds_id")):  # ZeRO-3: whole locally
                local = w.detach().clone().contiguous()
            if layer.ep_size > 1:  # rank r of the group holds experts r*E/N..
                local = torch.cat(comm.all_gather(local, group=layer.ep_group))
            whole.append(local.cpu())
        if state is None:
            continue
        placement = [entry["experts"] for entry in layer.expert_placement_descriptor["ranks"]]
        if [e for experts_of_rank in placement for e in experts_of_rank] != list(range(layer.num_experts)):
            raise ValueError(f"{name}: AutoEP placed the experts out of order ({placement}); not exported")
        w1, w3, w2 = whole
        converted = {}
        for key in [k for k in state if k.startswith(name + ".")]:
            tail = key[len(name) + 1:]
            value = state.pop(key)
            if tail.startswith("router.gate."):
                converted[f"{name}.gate.{tail[len('router.gate.'):]}"] = value
            elif tail.startswith("shared_experts."):
                converted[f"{name}.shared_expert.{tail[len('shared_experts.'):]}"] = value
            elif tail.startswith("shared_experts_gate."):
                converted[f"{name}.shared_expert_gate.{tail[len('shared_experts_gate.'):]}"] = value
            # the rest: AutoEP's alias of the router (`gate.gate.*`), the local experts, its counters
        converted[f"{name}.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        converted[f"{name}.experts.down_proj"] = w2
        state.update(converted)
    return state
