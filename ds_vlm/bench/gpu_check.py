"""One GPU, the real Qwen3-VL-2B architecture with random weights, bf16 training steps at growing sizes.

    python -m ds_vlm.bench.gpu_check [--sizes 8192,16384,32768,65536] [--steps 3] [--out F.json]
    bash launch/gpu_check.sh                     # the same, after installing carried wheels (see there)

Builds Qwen3-VL-2B-Instruct's architecture in GPU memory (no download, no disk), a processor with the demo
tokenizer, and Pokemon-like samples (one 1280x1280 image = 1,600 image tokens, a question and a ~10% answer,
~1.8k tokens); then trains through this trainer's own path (DeepSpeed ZeRO-2 json, the StepRunner, the
label-rows loss, activation checkpointing on the language tower, the vision tower frozen) on micro-batches
of ~8k, 16k, 32k and 64k tokens, one rank. Prints tokens/s, model TFLOP/s, MFU and peak memory per size
and the largest size that fits; a size that runs out of memory is reported as such and ends the sweep.
Last, one step runs under `torch.cuda.set_sync_debug_mode("warn")`: the host syncs it reports, by file.
On a CPU, `--preset tiny` runs the same path on the demo's model (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

QUESTION = "What is in this picture? Describe the shape and its colour."
ANSWER_SENTENCE = "It is a {color} {shape} on a light background."


def _single_rank_env() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def build(preset: str, device: torch.device, attn: str):
    """(model on the device, processor, adapter) of the preset, random weights."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.attention import resolve_attention
    from ds_vlm.demo import (
        COLORS,
        QWEN_SPECIAL_TOKENS,
        SHAPES,
        build_tokenizer,
        caption,
    )
    from ds_vlm.models import adapter_for
    from ds_vlm.models.qwen3_vl import qwen3_vl_2b_config, qwen3_vl_2b_processor

    if preset == "tiny":
        import tempfile

        from transformers import AutoProcessor

        from ds_vlm.demo import build_model_dir

        folder = build_model_dir(Path(tempfile.mkdtemp()) / "model")
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation=resolve_attention(attn))
        return model.to(device), AutoProcessor.from_pretrained(folder), adapter_for("qwen3_vl")
    words = [caption(c, s) for c in COLORS for s in SHAPES] + [QUESTION]
    words += [ANSWER_SENTENCE.format(color=c, shape=s) for c in COLORS for s in SHAPES]
    tokenizer = build_tokenizer(words)
    config = qwen3_vl_2b_config({t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16,
                                                        attn_implementation=resolve_attention(attn))
    processor = qwen3_vl_2b_processor(tokenizer)
    return model, processor, adapter_for("qwen3_vl")


def sample_record(tmp: Path, side: int, answer_sentences: int) -> Path:
    """One Pokemon-like record: an image of `side` pixels, a question, an answer of a few sentences."""
    import random

    from ds_vlm.demo import draw_shape

    draw_shape("red", "circle", random.Random(0), size=side).save(tmp / "image.png")
    answer = " ".join(ANSWER_SENTENCE.format(color="red", shape="circle") for _ in range(answer_sentences))
    record = {"conversations": [{"from": "human", "value": "<image>" + QUESTION}, {"from": "gpt", "value": answer}],
              "images": ["image.png"]}
    (tmp / "data.jsonl").write_text(json.dumps(record) + "\n")
    return tmp / "data.jsonl"


def sync_report(runner, micro) -> dict:
    """Host syncs reported by CUDA's sync debug mode during one step, counted by the file that caused them."""
    if not torch.cuda.is_available():
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pending = runner.start(micro)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    pending.result()
    return dict(Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}" for w in caught
                        if "synchroniz" in str(w.message)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("2b", "tiny"), default="2b")
    parser.add_argument("--sizes", default="8192,16384,32768,65536", help="tokens per step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per size (after one warm-up step)")
    parser.add_argument("--image_side", type=int, default=1280, help="pixels; 1280: 1,600 image tokens at patch 16")
    parser.add_argument("--answer_sentences", type=int, default=16, help="~10 tokens each")
    parser.add_argument("--attn_implementation", default="auto")
    parser.add_argument("--loss", default="chunked")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    import tempfile

    import deepspeed

    from ds_vlm.config import TrainConfig
    from ds_vlm.data.batching import Collator, SFTDataset
    from ds_vlm.data.encode import Encoder, set_pixel_bounds
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.distributed import init_distributed, setup_threads
    from ds_vlm.engine import (
        enable_checkpointing,
        param_groups,
        resolve_ds_config,
        set_trainable,
    )
    from ds_vlm.loss import LabelLoss, check_loss_available
    from ds_vlm.metrics import FlopsCounter, device_peak_tflops
    from ds_vlm.step import StepRunner

    _single_rank_env()
    setup_threads()
    init_distributed(600)
    check_loss_available(args.loss)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tmp = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    model, processor, adapter = build(args.preset, device, args.attn_implementation)
    side = args.image_side if args.preset == "2b" else 64  # the demo model's image size
    if args.preset == "2b":
        set_pixel_bounds(processor, 0, side * side)
    zero2 = Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json"
    config = TrainConfig(model="(in memory)", train_data=str(tmp), deepspeed=str(zero2),
                         precision="bf16" if cuda else "fp32", loss=args.loss,
                         attn_implementation=args.attn_implementation).validate(for_training=False)
    getattr(model.config, "text_config", model.config).use_cache = False
    groups = set_trainable(model, adapter, config)
    enable_checkpointing(model, adapter, config)
    ds_config = resolve_ds_config(config, 1)
    ds_config["optimizer"]["params"]["torch_adam"] = True  # skips FusedAdam's ~1 min JIT build
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(groups, config), config=ds_config)
    runner = StepRunner(engine, 1, torch.bfloat16 if cuda else torch.float32, LabelLoss(model, args.loss),
                        FlopsCounter(model, adapter, config))
    encoder = Encoder(processor, adapter, 1 << 20)
    sample = SFTDataset(RecordIndex([str(sample_record(tmp, side, args.answer_sentences))]), encoder)[0]
    length = int(sample["input_ids"].shape[1])
    labels = int((sample["labels"] != -100).sum())
    collate = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())
    peak_tflops = device_peak_tflops(0.0)
    setup_s = time.perf_counter() - started
    print(f"model built and engine ready in {setup_s:.0f} s on {torch.cuda.get_device_name() if cuda else 'cpu'}; "
          f"attention {model.config._attn_implementation}; one sample = {length} tokens ({labels} labels)", flush=True)

    rows, fits = [], 0
    for size in (int(s) for s in args.sizes.split(",")):
        n = max(1, size // length)
        batch, meta = collate([sample] * n)
        if cuda:
            batch = {k: v.pin_memory() for k, v in batch.items()}
            torch.cuda.reset_peak_memory_stats()
        times, row = [], {"target_tokens": size, "samples": n, "tokens": n * length}
        try:
            for step in range(1 + args.steps):
                begin = time.perf_counter()
                stats = runner.run([(dict(batch), dict(meta))])
                if cuda:
                    torch.cuda.synchronize()
                if step:
                    times.append(time.perf_counter() - begin)
        except torch.OutOfMemoryError:
            row["status"] = "out of memory"
            rows.append(row)
            break
        step_s = sorted(times)[len(times) // 2]
        flops = runner.count_flops(batch, n * labels)
        tflops = flops / step_s / 1e12
        row.update(status="ok", step_s=step_s, tokens_per_s=n * length / step_s, tflops=tflops,
                   mfu=tflops / peak_tflops if peak_tflops else None, loss=stats["loss"],
                   peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else max(stats["peak_mem_gb"]))
        rows.append(row)
        fits = n * length
        print(json.dumps(row), flush=True)
    syncs = sync_report(runner, [(dict(batch), dict(meta))]) if fits else {}

    print(f"\n{'Qwen3-VL-2B architecture' if args.preset == '2b' else 'the demo model'}, {config.precision}, "
          f"1 {'GPU' if cuda else 'CPU rank'}, ZeRO-2 json, sample {length} tokens, loss {args.loss}, "
          f"attention {model.config._attn_implementation}")
    print(f"{'tokens/step':>12} {'samples':>8} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GB':>8}  status")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['tokens']:>12} {r['samples']:>8} {'':>8} {'':>10} {'':>8} {'':>6} {'':>8}  {r['status']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['tokens']:>12} {r['samples']:>8} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['tflops']:>8.1f} {mfu:>6} {r['peak_mem_gb']:>8.1f}  ok")
    print(f"largest size that fits: {fits} tokens per step")
    print(f"host syncs in one step (CUDA sync debug mode, by file): {syncs or 'none'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "largest_tokens": fits, "syncs": syncs,
                                              "sample_tokens": length, "setup_s": setup_s}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
