"""Export a Hugging Face folder from a saved checkpoint, offline, on CPU.

    python -m ds_vlm.export CHECKPOINT_DIR OUT_DIR [--dtype bf16|fp32] [--max_shard_size 5GB]

CHECKPOINT_DIR is a checkpoint (OUTPUT_DIR/checkpoints/step_N), a checkpoints/ folder or an
output dir (its newest complete checkpoint is used). The fp32 master weights of every ZeRO
stage are consolidated from the rank files (frozen parameters included) and written as
safetensors with the config, generation config and processor files saved in the checkpoint.
Checkpoint files are read with torch.load(weights_only=True) and an allow-list of the few
DeepSpeed types they hold: nothing in them can run code.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch

from .checkpoint import HF_CONFIG, find_checkpoint, read_meta, save_hf


@contextlib.contextmanager
def _weights_only_loading():
    """Make DeepSpeed's checkpoint readers load with weights_only=True (they ask for False)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    with torch.serialization.safe_globals(allowed), mock.patch.object(torch, "load", safe_load):
        yield


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a checkpoint of any ZeRO stage."""
    meta = read_meta(checkpoint)
    with _weights_only_loading():
        if meta["zero_stage"] == 0:
            state = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
            return {k: v.float() for k, v in state.items()}
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def export(checkpoint_dir: str, out_dir: str, dtype: str = "bf16", max_shard_size: str = "5GB") -> Path:
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoProcessor,
        GenerationConfig,
    )

    checkpoint = find_checkpoint(checkpoint_dir)
    if checkpoint is None:
        raise SystemExit(f"ds-vlm export: no complete checkpoint in {checkpoint_dir}")
    state = consolidated_state_dict(checkpoint)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    hf_config = checkpoint / HF_CONFIG
    config = AutoConfig.from_pretrained(hf_config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SystemExit(f"ds-vlm export: the checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
    if (hf_config / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(hf_config)
    processor = AutoProcessor.from_pretrained(hf_config)
    save_hf(model, state, processor, str(out_dir), max_shard_size=max_shard_size)
    return checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--max_shard_size", default="5GB", help="safetensors files are split above this size")
    args = parser.parse_args(argv)
    checkpoint = export(args.checkpoint_dir, args.out_dir, args.dtype, args.max_shard_size)
    print(f"exported {checkpoint} -> {args.out_dir} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
