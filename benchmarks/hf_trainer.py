"""The transformers Trainer on the same DeepSpeed json, for benchmarks/main.py (the LLaVA / Qwen-VL path).

    deepspeed --num_gpus 2 --module benchmarks.hf_trainer --model DIR --train_data F.jsonl \
        --deepspeed ds_configs/zero2.json --output_dir OUT [--max_steps 30 --micro_batch_size 8 ...]

Only the training engine differs from launch/train.py: the samples come from ds_vlm's Encoder and
Collator (the collator's (batch, meta) pairs are unwrapped to the batch), the same parts train (vision
tower frozen, projector and language tower trained), the same AdamW settings and gradient clipping.
The ZeRO json is copied with "auto" in every key the Trainer fills in (batch sizes, clipping, bf16,
the optimizer's lr/betas/eps/weight decay); the LR schedule is the Trainer's own (cosine, no warmup).

Each rank writes OUT/steps_rank{R}.jsonl: per optimizer step the time at its end, and the samples,
real tokens and padded (computed) tokens it ran; benchmarks/main.py joins the ranks. At the end each rank
writes OUT/peak_rank{R}.json (peak RSS; CUDA peak allocated memory on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

# What the Trainer fills in from TrainingArguments when the json says "auto".
AUTO_KEYS = (("train_micro_batch_size_per_gpu",), ("gradient_accumulation_steps",), ("train_batch_size",),
             ("gradient_clipping",), ("bf16", "enabled"), ("optimizer", "params", "lr"),
             ("optimizer", "params", "betas"), ("optimizer", "params", "eps"),
             ("optimizer", "params", "weight_decay"))


def hf_ds_config(path: str) -> dict:
    """The ZeRO json as the HF Trainer wants it: the same ZeRO settings, "auto" where the Trainer decides."""
    with open(path) as f:
        ds = json.load(f)
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    ds["optimizer"].setdefault("params", {})
    for keys in AUTO_KEYS:
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(keys[-1], "auto")
    ds.setdefault("steps_per_print", 10**9)  # as ds_vlm sets it: no DeepSpeed progress lines
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def patch_accelerate_for_cpu_ranks() -> bool:
    """Let accelerate see the DeepSpeed launcher's CPU ranks as one world (gloo). Returns whether it patched.

    Without a GPU, accelerate's PartialState finds no backend for a process launched with LOCAL_RANK set and
    falls back to "not distributed": every rank believes it is process 0 of 1. The Trainer then fills the
    json's "auto" train_batch_size with micro_batch x 1 while DeepSpeed's world has 2 ranks, and
    deepspeed.initialize fails ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step *
    world_size 8 != 8 * 1 * 2"); even without that key, ranks would not shard the data. Only setup changes:
    the backend choice becomes gloo (what DeepSpeed itself picks on CPU); the training step is untouched.
    """
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        if found is None and kind == DistributedType.NO:
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    PartialState._prepare_backend = _prepare_backend
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train_data", required=True)
    parser.add_argument("--deepspeed", required=True, help="a ds_configs/zeroK.json (ZeRO settings only)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--gradient_checkpointing", default="false", choices=("true", "false"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--accelerate_cpu_patch", default="true", choices=("true", "false"),
                        help="on CPU ranks, let accelerate use gloo (without it the Trainer cannot start there)")
    args, _ = parser.parse_known_args()  # the launcher adds --local_rank
    if os.environ.get("BENCH_TRACE_S"):  # debugging a slow or stuck rank: its stacks every N seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["BENCH_TRACE_S"]), repeat=True)

    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoProcessor,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from ds_vlm.config import ModelConfig
    from ds_vlm.data.batching import Collator, SFTDataset
    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for
    from ds_vlm.models.loading import prepare_for_training
    from ds_vlm.runtime.distributed import setup_threads

    setup_threads()  # each CPU rank its share of the cores, as launch/train.py does
    os.makedirs(args.output_dir, exist_ok=True)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and torch.cuda.is_available()
                                        and torch.cuda.is_bf16_supported())
    ds_path = os.path.join(args.output_dir, "ds_config_hf.json")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank == 0:
        with open(ds_path + ".tmp", "w") as f:
            json.dump(hf_ds_config(args.deepspeed), f, indent=2)
        os.replace(ds_path + ".tmp", ds_path)
    else:
        deadline = time.time() + 60
        while not os.path.exists(ds_path) and time.time() < deadline:
            time.sleep(0.05)

    patched = args.accelerate_cpu_patch == "true" and patch_accelerate_for_cpu_ranks()
    training_args = TrainingArguments(
        output_dir=args.output_dir, deepspeed=ds_path, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=1, max_steps=args.max_steps, learning_rate=args.lr, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=0, bf16=bf16, logging_steps=10**6, save_strategy="no", report_to="none", seed=args.seed,
        dataloader_num_workers=args.num_workers, dataloader_prefetch_factor=4 if args.num_workers else None,
        remove_unused_columns=False, disable_tqdm=True, gradient_checkpointing=args.gradient_checkpointing == "true",
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    # TrainingArguments(deepspeed=...) holds an HfDeepSpeedConfig: under ZeRO-3 from_pretrained partitions.
    model_config = AutoConfig.from_pretrained(args.model)
    adapter = adapter_for(model_config.model_type)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    # ds_vlm's default trainable parts; the model as transformers builds it, checkpointed by the Trainer's own flag
    prepare_for_training(model, adapter, ModelConfig(), family_changes=False, checkpointing=False)
    processor = AutoProcessor.from_pretrained(args.model)
    encoder = Encoder(processor, adapter, args.max_length)
    dataset = SFTDataset(RecordIndex(args.train_data), encoder)
    collator = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())

    try:
        from ds_vlm.runtime.flops import FlopsCounter

        flops_of = FlopsCounter(model, adapter, ModelConfig())
    except Exception:  # noqa: BLE001 - FLOPs are optional in the report
        flops_of = None

    def collate(samples):
        micro = collator(samples)
        return {**micro.inputs, "labels": micro.labels, "_bench_meta": micro}

    rank = int(os.environ.get("RANK", "0"))
    log = open(os.path.join(args.output_dir, f"steps_rank{rank}.jsonl"), "w", buffering=1)
    pending = {"samples": 0, "tokens": 0, "computed": 0, "flops": 0.0, "loss": 0.0}

    class BenchTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            micro = inputs.pop("_bench_meta")
            for key in ("samples", "tokens", "computed"):
                pending[key] += getattr(micro, key)
            if flops_of is not None:  # the same model FLOPs as ds-vlm's (the head on label rows only)
                pending["flops"] += flops_of(micro.inputs, micro.targets, micro.sample_lengths)
            loss = super().training_step(model, inputs, num_items_in_batch)
            pending["loss"] = float(loss)
            return loss

    class StepTimes(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            log.write(json.dumps({"step": state.global_step, "time": time.perf_counter(), **pending}) + "\n")
            pending.update(samples=0, tokens=0, computed=0, flops=0.0)

    trainer = BenchTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                           callbacks=[StepTimes()])
    log.write(json.dumps({"event": "start", "time": time.perf_counter(), "accelerate_cpu_patch": patched,
                          "world_size": training_args.world_size, "process_index": training_args.process_index})
              + "\n")
    trainer.train()
    log.close()
    peak = {"rank": rank, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if torch.cuda.is_available():
        peak["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    with open(os.path.join(args.output_dir, f"peak_rank{rank}.json"), "w") as f:
        json.dump(peak, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
