"""Save DeepSpeed checkpoints and export a Hugging Face folder from the live engine."""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist


def save_checkpoint(engine, output_dir: str, step: int, client_state: dict) -> str:
    """All ranks: write OUTPUT_DIR/checkpoints/step_N (DeepSpeed layout, 'latest' updated)."""
    root = os.path.join(output_dir, "checkpoints")
    tag = f"step_{step:08d}"
    engine.save_checkpoint(root, tag=tag, client_state=client_state)
    return os.path.join(root, tag)


def gathered_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (None elsewhere); collective under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def export_hf(engine, processor, out_dir: str) -> None:
    """All ranks: consolidated safetensors + config + processor files in out_dir (written atomically)."""
    state = gathered_state_dict(engine)
    if dist.get_rank() == 0:
        model = engine.module
        staging = out_dir.rstrip("/") + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        use_cache = model.config.use_cache
        model.config.use_cache = True  # training turns the KV cache off; generation wants it
        try:
            # Module names are the canonical keys; reverting load-time renames mangled them under ZeRO-3.
            model.save_pretrained(staging, state_dict=state, safe_serialization=True, save_original_format=False)
        finally:
            model.config.use_cache = use_cache
        processor.save_pretrained(staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    dist.barrier()
