"""The planner's activations against a measurement, on the CPU: one real micro-batch of the demo data, the real
model's forward and backward measured by torch.profiler's memory timeline (`profile_memory=True`: every CPU
allocation and release, the parameters' gradients left out by allocation id), and the same micro-batch traced
by ds_vlm.memplan.planner on fake tensors. The two share no code: the profiler sees the real allocator.

    python -m benchmarks.plan_accuracy [--model DIR] [--out plan_accuracy.json]

Rows: checkpointing off and on, images and text, padded and packed, LoRA. Target: within 10% in every row.
Model states (ZeRO's partitions) are not measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROWS = (  # name, ModelConfig overrides, packing, records
    ("text, no checkpointing", {"gradient_checkpointing": False}, False, "text"),
    ("text, checkpointing", {"gradient_checkpointing": True}, False, "text"),
    ("images, no checkpointing", {"gradient_checkpointing": False}, False, "images"),
    ("images, checkpointing", {"gradient_checkpointing": True}, False, "images"),
    ("images, packed, checkpointing", {"gradient_checkpointing": True}, True, "images"),
    ("images, LoRA r8", {"gradient_checkpointing": True, "lora_rank": 8, "lora_alpha": 16.0}, False, "images"),
)
TARGET = 0.10


def measured_activations(model, micro, rows, context) -> int:
    """Peak bytes of everything the real forward and backward allocate, the gradients left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        with context.armed(micro, rows) as forward:
            loss = forward.loss(model(**forward.inputs))
        loss.backward()
    timeline = prof._memory_profile().timeline
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    latest = {}
    for _, action, key, _ in timeline:
        if key is not None and hasattr(key[0], "storage") and "CREATE" in str(action):
            latest[key[0].storage.ptr] = key[0].storage.allocation_id
    leave_out = {latest[ptr] for ptr in grads if ptr in latest}
    live = peak = 0
    for _, action, key, size in timeline:
        if key is not None and hasattr(key[0], "storage") and key[0].storage.allocation_id in leave_out:
            continue
        if "CREATE" in str(action):
            live += size
        elif "DESTROY" in str(action):
            live -= size
        peak = max(peak, live)
    return peak


def compare(model_dir: str, records: list[dict], overrides: dict, packing: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.config import ModelConfig
    from ds_vlm.data.batching import Collator
    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.formats import to_sample
    from ds_vlm.data.images import load_images
    from ds_vlm.memplan.trace import trace_activations
    from ds_vlm.models import adapter_for
    from ds_vlm.models.loading import prepare_for_training
    from ds_vlm.train.forward import ForwardContext
    from ds_vlm.train.loss import LabelLoss, LabelRows

    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(config.model_type)
    model_config = ModelConfig(path=model_dir, **overrides)
    processor = AutoProcessor.from_pretrained(model_dir)
    encoder = Encoder(processor, adapter, 4096)
    samples = [encoder.encode(s, load_images(s)) for s in (to_sample(r, str(Path(model_dir).parent / "data" / "x"), i)
                                                            for i, r in enumerate(records))]
    positions = adapter.position_ids(config) if (packing or adapter.padded_batch_positions) else None
    collator = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), positions, packing=packing)
    micro = collator(samples)
    rows = LabelRows.from_labels(micro.labels)
    torch.manual_seed(0)
    attention = "sdpa"
    if packing:  # the trainer's packed attention: the varlen interface with the samples' boundaries
        from ds_vlm.parallel.attention import VARLEN, register_varlen

        register_varlen()
        attention = VARLEN
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    trained = prepare_for_training(model, adapter, model_config).trained
    trained.train()
    boundaries = None
    if packing:
        from ds_vlm.parallel.attention import SampleBoundaries

        boundaries = SampleBoundaries(adapter.parts(model).llm_decoder, stand_in_mask=True)
    context = ForwardContext(LabelLoss(model, model_config.loss), torch.device("cpu"), torch.float32, boundaries)
    measured = measured_activations(trained, micro, rows, context)
    planned = trace_activations(config, model_config, adapter, micro, torch.float32).peak
    return {"tokens": int(micro.inputs["input_ids"].numel()), "measured_mb": measured / 1e6,
            "planned_mb": planned / 1e6, "ratio": planned / measured if measured else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a tiny model folder with ../data (default: the demo's, built)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    model = Path(args.model) if args.model else None
    if model is None:
        from ds_vlm.demo import build_data_dir, build_model_dir

        work = Path(tempfile.mkdtemp(prefix="ds_vlm_plan_accuracy_"))
        build_model_dir(work / "model", seed=0)
        build_data_dir(work / "data", 16, 2, seed=0)
        model = work / "model"
    lines = (model.parent / "data" / "train.jsonl").read_text().splitlines()[:args.samples]
    with_images = [json.loads(line) for line in lines]
    for record in with_images:  # absolute image paths: the records are read from another folder
        record["images"] = [str(model.parent / "data" / p) for p in record["images"]]
    text = [{"conversations": [{"from": "human", "value": r["conversations"][0]["value"].replace("<image>", "")},
                               r["conversations"][1]]} for r in with_images]
    report, worst = {"rows": {}}, 0.0
    print(f"{'row':<34}{'tokens':>8}{'measured MB':>13}{'planned MB':>12}{'planned/measured':>18}")
    for name, overrides, packing, kind in ROWS:
        row = compare(str(model), with_images if kind == "images" else text, overrides, packing)
        report["rows"][name] = row
        worst = max(worst, abs(row["ratio"] - 1))
        print(f"{name:<34}{row['tokens']:>8}{row['measured_mb']:>13.3f}{row['planned_mb']:>12.3f}{row['ratio']:>18.3f}")
    report["target_met"] = worst <= TARGET
    print(f"target (every row within {TARGET:.0%}): {'MET' if report['target_met'] else 'NOT MET'} "
          f"(worst {worst:.1%})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
