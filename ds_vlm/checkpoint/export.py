"""Export a Hugging Face folder from a saved checkpoint, offline, on CPU.

    python -m ds_vlm.export CHECKPOINT_DIR OUT_DIR [--dtype bf16|fp32] [--max_shard_size 5GB] [--adapter_dir D]

CHECKPOINT_DIR is a checkpoint (OUTPUT_DIR/checkpoints/step_N), a checkpoints/ folder or an
output dir (its newest complete checkpoint is used). The fp32 master weights of every ZeRO
stage are consolidated from the rank files (frozen parameters included) and written as
safetensors with the config, generation config and processor files saved in the checkpoint. A LoRA
checkpoint holds only what trained: the base weights are read from the run's --model (a QLoRA run's
through 4-bit NF4 and back, as its run saw them), the adapters merged into OUT_DIR, and peft's adapter
folder written to --adapter_dir (default OUT_DIR-adapter).
Checkpoint files are read with torch.load(weights_only=True) and an allow-list of the few
DeepSpeed types they hold: nothing in them can run code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ds_vlm.checkpoint.hf import plain_model, save_hf, save_lora_exports
from ds_vlm.checkpoint.meta import HF_CONFIG, read_meta
from ds_vlm.checkpoint.resume import find_checkpoint
from ds_vlm.models.lora import from_description
from ds_vlm.patches.torch_serialization import weights_only_loading


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a checkpoint of any ZeRO stage."""
    with weights_only_loading():  # ds_vlm/patches/torch_serialization.py
        if read_meta(checkpoint).run.zero_stage == 0:
            state = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
            return {k: v.float() for k, v in state.items()}
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def export(checkpoint_dir: str, out_dir: str, dtype: str = "bf16", max_shard_size: str = "5GB",
           adapter_dir: str = "") -> Path:
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    checkpoint = find_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise SystemExit(f"ds-vlm export: no complete checkpoint in {checkpoint_dir}")
    run = read_meta(checkpoint).run
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    state = {k: v.to(torch_dtype) for k, v in consolidated_state_dict(checkpoint).items()}
    hf_config = checkpoint / HF_CONFIG
    config = AutoConfig.from_pretrained(hf_config)
    generation = (GenerationConfig.from_pretrained(hf_config) if (hf_config / "generation_config.json").is_file()
                  else None)
    processor = AutoProcessor.from_pretrained(hf_config)
    if run.lora:  # the checkpoint holds what trained; the frozen base weights are the run's --model
        lora = from_description(run.lora)
        full = {**base_weights_for(run.config, lora, torch_dtype), **state}
        save_lora_exports(full, lora, config, generation, processor, str(out_dir),
                          adapter_dir or str(out_dir).rstrip("/") + "-adapter")
        return checkpoint
    try:
        model = plain_model(config, state, generation)
    except ValueError as err:
        raise SystemExit(f"ds-vlm export: the checkpoint {err}") from err
    save_hf(model, state, processor, str(out_dir), max_shard_size=max_shard_size)
    return checkpoint


def base_weights_for(run: dict, lora, dtype) -> dict[str, torch.Tensor]:
    """The base model's weights (the run's --model; `run`: its checkpoint's config) under the names the
    LoRA-wrapped model gives them. A QLoRA run's (--lora_bits 4) base is loaded as the run loaded it, its
    language tower in 4-bit NF4, then dequantized: the weights its adapters trained beside, which the run's own
    export merges them into too."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ds_vlm.config import ModelConfig
    from ds_vlm.models import adapter_for
    from ds_vlm.models.loading import quantization_config
    from ds_vlm.models.lora import dequantized_state_dict

    model = ModelConfig(path=run["model"], trust_remote_code=run.get("trust_remote_code", False),
                        lora_rank=run.get("lora_rank", 0), lora_bits=run.get("lora_bits", 0))
    quantized = {}
    if model.lora_bits:
        config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        quantized = {"quantization_config": quantization_config(model, adapter_for(config.model_type), dtype, False,
                                                                config), "device_map": {"": "cpu"}}
    base = AutoModelForImageTextToText.from_pretrained(model.path, dtype=dtype,
                                                       trust_remote_code=model.trust_remote_code, **quantized)
    targets = set(lora.target_modules)
    out = {}
    for key, value in dequantized_state_dict(base, base.state_dict()).items():
        module, _, leaf = key.rpartition(".")
        inner = f"{module}.base_layer.{leaf}" if module in targets else key
        out[f"base_model.model.{inner}"] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--max_shard_size", default="5GB", help="safetensors files are split above this size")
    parser.add_argument("--adapter_dir", default="", help="LoRA runs: where peft's adapter folder goes "
                                                           "(default: OUT_DIR-adapter)")
    args = parser.parse_args(argv)
    checkpoint = export(args.checkpoint_dir, args.out_dir, args.dtype, args.max_shard_size, args.adapter_dir)
    print(f"exported {checkpoint} -> {args.out_dir} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
