"""The benchmark's plain PyTorch case, one process:

    python -m benchmarks.plain_loop --model DIR --train_data F.jsonl --output_dir OUT \
        [--max_steps 30 --micro_batch_size 8 --world_size 2 ...]

Writes OUT/metrics.jsonl, one line per step, as launch/train.py does."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def plain_loop(argv: list[str]) -> int:
    """The reference: one process, the same model, the same global batches (BatchPlan with the benchmark's
    world size), one forward of the whole global batch per step, torch.optim.AdamW, clipping at 1.0."""
    import resource

    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.config import ModelConfig
    from ds_vlm.data.batching import Collator, SFTDataset
    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.plan import BatchPlan
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for
    from ds_vlm.models.loading import set_trainable
    from ds_vlm.runtime.distributed import setup_threads
    from ds_vlm.train.loss import LabelLoss, LabelRows

    parser = argparse.ArgumentParser(prog="bench.py plain-loop")
    for name, kind, default in (("model", str, None), ("train_data", str, None), ("output_dir", str, None),
                                ("max_steps", int, 30), ("micro_batch_size", int, 8), ("lr", float, 1e-4),
                                ("max_length", int, 4096), ("num_workers", int, 1), ("seed", int, 42),
                                ("world_size", int, 2), ("gradient_checkpointing", str, "false")):
        parser.add_argument(f"--{name}", type=kind, default=default, required=default is None)
    args = parser.parse_args(argv)
    os.environ.pop("LOCAL_SIZE", None)
    setup_threads()  # one process: all the cores
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    config = ModelConfig(path=args.model)
    adapter = adapter_for(AutoConfig.from_pretrained(args.model).model_type)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).to(device)
    getattr(model.config, "text_config", model.config).use_cache = False
    set_trainable(model, adapter, config)
    if args.gradient_checkpointing == "true":
        from ds_vlm.models.loading import enable_checkpointing

        enable_checkpointing(model, adapter, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    try:
        from ds_vlm.runtime.flops import FlopsCounter

        flops_of = FlopsCounter(model, adapter, config)
    except Exception:  # noqa: BLE001 - FLOPs are optional in the report
        flops_of = None
    label_loss = LabelLoss(model)
    processor = AutoProcessor.from_pretrained(args.model)
    encoder = Encoder(processor, adapter, args.max_length)
    dataset = SFTDataset(RecordIndex(args.train_data), encoder)
    plan = BatchPlan(len(dataset), args.micro_batch_size, 1, args.world_size, args.seed)
    batches = [plan.step_samples(step) for step in range(args.max_steps)]
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=Collator(encoder.tokenizer.pad_token_id,
                                                                            encoder.dummy()),
                        num_workers=args.num_workers, prefetch_factor=4 if args.num_workers else None,
                        worker_init_fn=(lambda _: torch.set_num_threads(1)) if args.num_workers else None)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "w", buffering=1) as log:
        last = time.perf_counter()
        for step, micro in enumerate(loader):
            inputs = {k: v.to(device) for k, v in micro.inputs.items()}
            rows = LabelRows.from_labels(micro.labels)
            flops = flops_of(inputs, len(rows), micro.sample_lengths) if flops_of is not None else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                summed = label_loss.loss_of(model, inputs, rows.to(device))
            (summed / micro.targets).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = summed.item() / micro.targets
            now = time.perf_counter()
            elapsed, last = now - last, now
            log.write(json.dumps({"step": step + 1, "loss": loss, "grad_norm": float(grad_norm),
                                  "step_time_s": elapsed, "samples": micro.samples, "tokens": micro.tokens,
                                  "computed": micro.computed, "samples_per_s": micro.samples / elapsed,
                                  "tokens_per_s": micro.tokens / elapsed, "flops": flops,
                                  "peak_mem_gb": [torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda"
                                                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6]})
                      + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(plain_loop(sys.argv[1:]))
