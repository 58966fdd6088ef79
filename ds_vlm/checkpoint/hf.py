"""The Hugging Face export of a live engine: the weights gathered on rank 0 (every ZeRO stage), written with the
config and processor as `from_pretrained` reads them; with LoRA, merged and peft's adapter folder beside.
(checkpoint/export.py exports a saved checkpoint instead, offline.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ds_vlm.models.base import cache_configs, set_use_cache
from ds_vlm.runtime.distributed import store_barrier


def gathered_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (None elsewhere); collective under ZeRO-3. With AutoEP under ZeRO-3
    (DeepSpeed's consolidation refuses it: the experts are partitioned over their expert-data-parallel group),
    each parameter is gathered over its own partition group in turn; rank 0 keeps its EP rank's experts, which
    parallel/expert.py's hf_state_of_autoep completes."""
    from ds_vlm.parallel.expert import autoep_layers

    if engine.zero_optimization_partition_weights() and autoep_layers(engine.module):
        import deepspeed

        state, seen = ({} if dist.get_rank() == 0 else None), {}
        for name, param in engine.module.named_parameters(remove_duplicate=False):  # tied: both names, one tensor
            if id(param) not in seen:
                with deepspeed.zero.GatheredParameters([param]):
                    seen[id(param)] = param.detach().clone().cpu() if state is not None else None
            if state is not None:
                state[name] = seen[id(param)]
        if state is not None:  # the persistent buffers
            state.update({k: v.detach().cpu() for k, v in engine.module.state_dict().items() if k not in state})
        return state
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_hf(model, state: dict, processor, out_dir: str, max_shard_size: str = "5GB") -> None:
    """Write safetensors + config + processor into out_dir, via a staging folder renamed at the end."""
    staging = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    configs = cache_configs(model.config)
    use_cache = [getattr(c, "use_cache", True) for c in configs]
    set_use_cache(model.config, True)  # training turns the KV cache off; generation wants it
    try:
        # Module names are the canonical keys; reverting load-time renames mangled them under ZeRO-3.
        model.save_pretrained(staging, state_dict=state, safe_serialization=True, save_original_format=False,
                              max_shard_size=max_shard_size)
    finally:
        for c, value in zip(configs, use_cache):
            c.use_cache = value
    processor.save_pretrained(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)


def plain_model(config, state: dict, generation_config=None):
    """A model of `config` whose parameters are `state`'s tensors (no copy), built on the meta device. While
    a ZeRO-3 run's HfDeepSpeedConfig is alive, transformers would build it partitioned (zero.Init: collectives
    only rank 0 would join), so that config is set aside meanwhile."""
    import copy
    from collections import Counter

    from transformers import AutoModelForImageTextToText

    from ds_vlm.patches.transformers_loading import zero3_init_set_aside

    dtype = Counter(v.dtype for v in state.values() if v.is_floating_point()).most_common(1)[0][0]
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # QLoRA's run: these weights are full precision (dequantized)
        del config.quantization_config
    with torch.device("meta"), zero3_init_set_aside():
        # plain sdpa: the run's own kernels (the varlen interface) are registered names that mean nothing here
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the weights lack {len(missing)} parameters, e.g. {missing[:3]}")
    if generation_config is not None:
        model.generation_config = generation_config
    return model


def save_lora_exports(state: dict, lora, config, generation_config, processor, out_dir: str, adapter_dir: str):
    """LoRA: out_dir gets the weights with the adapters merged (plain `from_pretrained`), adapter_dir peft's
    adapter folder. `state` is the peft model's full state dict."""
    from ds_vlm.models.lora import merged_state_dict, save_adapter

    merged = merged_state_dict(state, lora)  # quantized weights must be dequantized before (export_hf does)
    save_hf(plain_model(config, merged, generation_config), merged, processor, out_dir)
    save_adapter(state, lora, adapter_dir)


def export_hf(engine, processor, out_dir: str, lora=None, long_timeout_s: float = 7200) -> None:
    """All ranks: consolidated weights of the live engine -> out_dir on rank 0 (with LoRA: merged, and peft's
    adapter folder beside it, `adapter/`); the others wait for rank 0's writing through the store."""
    from ds_vlm.parallel.expert import autoep_layers, hf_state_of_autoep

    state = gathered_state_dict(engine)
    expert_parallel = bool(autoep_layers(engine.module))
    if expert_parallel:  # AutoEP's layers back in the transformers layout, the experts gathered from each EP group
        state = hf_state_of_autoep(engine.module, state)
    if dist.get_rank() == 0:
        if expert_parallel:
            model = engine.module
            save_hf(plain_model(model.config, state, model.generation_config), state, processor, out_dir)
        elif lora is None:
            save_hf(engine.module, state, processor, out_dir)
        else:
            from ds_vlm.models.lora import dequantized_state_dict

            state = dequantized_state_dict(engine.module, state)  # QLoRA: 4-bit weights back to full precision
            save_lora_exports(state, lora, engine.module.config, engine.module.generation_config, processor, out_dir,
                              str(Path(out_dir).parent / "adapter"))
    store_barrier(f"rank 0 writing {out_dir}", long_timeout_s)
