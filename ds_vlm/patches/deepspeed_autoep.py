"""DeepSpeed's AutoEP (parallel/expert.py): the router logits of the replaced MoE blocks recorded again, so that
transformers' load-balancing (aux) loss gets them."""

from __future__ import annotations

from ds_vlm.patches import patch

ROUTER_LOGITS = patch(
    "autoep_router_logits_recorder", library="transformers, deepspeed",
    versions="transformers 5.24.0, deepspeed 0.19.8",
    target="transformers' output-capture registry entry (utils.output_capturing._CAN_RECORD_REGISTRY) of each "
           "sub-model class that holds AutoEP layers and records `router_logits`: its recorder pointed at AutoEP's "
           "router gate (the nn.Linear at `<block>.router.gate`, output = the raw router logits); the capture hooks "
           "installed before are removed and the sub-models marked unhooked, so the next recording forward "
           "installs them anew",
    reason="transformers records the router logits from its own router class (Qwen3VLMoeTextTopKRouter, "
           "Qwen3_5MoeTopKRouter, output 0 = F.linear(hidden, weight)); AutoEP replaces the whole MoE block, so "
           "that class is gone and output_router_logits finds nothing (the aux loss fails on an empty tuple). "
           "AutoEP's own retargeting matches Qwen3-MoE/Qwen2-MoE class names only (the qwen3_moe preset) or "
           "refuses the VLM's model_type (the qwen3_5_moe preset), and its registry restore calls the registry's "
           "get() with two arguments, which transformers 5.24's _CanRecordRegistry.get does not take",
    scope="Trainer.setup_engine after deepspeed.initialize, where --expert_parallel > 1 and the config asks for "
          "the aux loss; the registry entries stay changed for the process (it trains that one model)")


def _remove_capture_hooks(model) -> None:
    for module in model.modules():
        hooks = getattr(module, "_forward_hooks", None) or {}
        for hook_id, hook in list(hooks.items()):
            if getattr(hook, "__name__", "") == "output_capturing_hook":
                del hooks[hook_id]
                for table in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    getattr(module, table, {}).pop(hook_id, None)
        if hasattr(module, "_output_capturing_hooks_installed"):
            module._output_capturing_hooks_installed = False


def record_router_logits_of_autoep(model) -> int:
    """Point the router-logits recorders of `model`'s sub-models at AutoEP's router gates; the number of
    sub-model classes changed (0: no AutoEP layer, or nothing records router logits)."""
    from transformers.modeling_utils import PreTrainedModel
    from transformers.utils import output_capturing

    layers = [m for m in model.modules() if getattr(m, "_is_autoep_layer", False)]
    if not layers:
        return 0
    recorder = output_capturing.OutputRecorder(type(layers[0].router.gate), index=0, layer_name="router.gate")
    registry = output_capturing._CAN_RECORD_REGISTRY
    changed = set()
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or type(module) in changed:
            continue
        entry = registry.get(module)
        if "router_logits" in entry and any(getattr(m, "_is_autoep_layer", False) for m in module.modules()):
            registry[module] = {**entry, "router_logits": recorder}
            changed.add(type(module))
    if changed:
        _remove_capture_hooks(model)
    return len(changed)
