"""The GPU check's sweep: the real Qwen3-VL-2B architecture with random weights, packed bf16 training steps at
growing sizes, one GPU, in this process.

Builds Qwen3-VL-2B-Instruct's architecture in GPU memory (no download, no disk), a processor with the demo
tokenizer, and Pokemon-like samples (one 1280x1280 image = 1,600 image tokens, a question and a ~10% answer,
~1.8k tokens); then trains through this trainer's own step (a ZeRO-2 engine, the StepRunner, the label-row
loss, activation checkpointing on the language tower, the vision tower frozen) on one packed micro-batch of
about 8k, 16k, 32k and 64k tokens (the reference recipe's 65,536 packed tokens per GPU is the last), on the
attention kernel `auto` picks here. Per size: tokens/s, model TFLOP/s and MFU, peak allocated and reserved
memory; a size that runs out of memory is recorded as such (its memory released) and ends the sweep, and the
report is written either way. Last, one step under `torch.cuda.set_sync_debug_mode("warn")`: the host syncs
it reports, by file. `preset="tiny"` runs the same path on the demo's model on a CPU (the dry run).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

QUESTION = "What is in this picture? Describe the shape and its colour."
ANSWER_SENTENCE = "It is a {color} {shape} on a light background."


def _single_rank_env() -> None:
    from ds_vlm.runtime.distributed import free_port

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)


def build(preset: str, device: torch.device, attention: str):
    """(model on the device, processor, adapter) of the preset, random weights, as transformers builds it (the
    sweep prepares it as the trainer does: prepare_for_training)."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.demo import COLORS, QWEN_SPECIAL_TOKENS, SHAPES, build_tokenizer, caption
    from ds_vlm.models import adapter_for
    from ds_vlm.testing.real import qwen3_vl_2b_config, qwen3_vl_2b_processor

    adapter = adapter_for("qwen3_vl")
    if preset == "tiny":
        from transformers import AutoProcessor

        from ds_vlm.demo import build_model_dir

        folder = build_model_dir(Path(tempfile.mkdtemp()) / "model")
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
        return model.to(device), AutoProcessor.from_pretrained(folder), adapter
    words = [caption(c, s) for c in COLORS for s in SHAPES] + [QUESTION]
    words += [ANSWER_SENTENCE.format(color=c, shape=s) for c in COLORS for s in SHAPES]
    tokenizer = build_tokenizer(words)
    config = qwen3_vl_2b_config({t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16, attn_implementation=attention)
    return model, qwen3_vl_2b_processor(tokenizer), adapter


def describe(model, processor, out: Path) -> Path:
    """The model's config and processor, no weights: what `python -m ds_vlm.plan` needs to plan it."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    processor.save_pretrained(out)
    return out


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
    pending.stats()
    return dict(Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}" for w in caught
                        if "synchroniz" in str(w.message)))


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sweep(preset: str = "2b", sizes=(8192, 16384, 32768, 65536), steps: int = 3, image_side: int = 1280,
          answer_sentences: int = 16, loss: str = "chunked") -> dict:
    import deepspeed

    from ds_vlm.config import TrainConfig
    from ds_vlm.data.batching import Collator, SFTDataset
    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.pixels import set_pixel_bounds
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models.loading import prepare_for_training
    from ds_vlm.parallel.attention import SampleBoundaries, kernel_description, resolve_attention
    from ds_vlm.runtime.distributed import init_distributed, setup_threads
    from ds_vlm.runtime.flops import FlopsCounter, device_peak_tflops
    from ds_vlm.train.ds_config import DSSettings, resolve_ds_config, settle_optimizer
    from ds_vlm.train.forward import ForwardContext
    from ds_vlm.train.loss import LabelLoss
    from ds_vlm.train.optim import param_groups
    from ds_vlm.train.step import StepRunner

    _single_rank_env()
    setup_threads()
    init_distributed(600)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tmp = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    attention = resolve_attention("auto", packing=True)
    model, processor, adapter = build(preset, device, attention)
    model_dir = describe(model, processor, tmp / "model")  # what the plan stage plans (config and processor)
    side = image_side if preset == "2b" else 64  # the demo model's image size
    if preset == "2b":
        set_pixel_bounds(processor, 0, side * side)
    config = TrainConfig.from_keys(model="(in memory)", train_data=str(tmp), deepspeed=str(_zero2_json()),
                                   precision="bf16" if cuda else "fp32", loss=loss, packing=True)
    config.validate(for_training=False)
    groups = prepare_for_training(model, adapter, config.model).groups
    ds_config = resolve_ds_config(config, 1)
    adam = settle_optimizer(DSSettings.of(ds_config))
    ds_config, optimizer = adam.applied(ds_config), adam.description
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(groups, config.optim),
                                      config=ds_config)
    engine.train()  # checkpointing acts in training mode only (as the trainer does)
    boundaries = SampleBoundaries(adapter.parts(model).llm_decoder, stand_in_mask=attention != "flash_attention_2")
    context = ForwardContext(LabelLoss(model, loss), engine.device, torch.bfloat16 if cuda else torch.float32,
                             boundaries)
    # peak_tensor_gb: max_memory_allocated on CUDA; on the dry run's CPU the live-tensor meter (the plan stage's
    # measurement)
    runner = StepRunner(engine, 1, context, FlopsCounter(model, adapter, config.model), measure_memory=not cuda)
    encoder = Encoder(processor, adapter, 1 << 20)
    sample = SFTDataset(RecordIndex([str(sample_record(tmp, side, answer_sentences))]), encoder)[0]
    length = int(sample["input_ids"].shape[1])
    collate = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), adapter.position_ids(model.config),
                       packing=True)
    peak_tflops = device_peak_tflops(0.0)
    setup_s = time.perf_counter() - started
    kernel = kernel_description(attention)
    print(f"model built and engine ready in {setup_s:.0f} s on {torch.cuda.get_device_name() if cuda else 'cpu'}; "
          f"attention {kernel}; optimizer {optimizer}; one sample = {length} tokens", flush=True)
    rows, fits, last_ok = [], 0, None
    for size in sizes:
        n = max(1, size // length)
        row = {"target_tokens": size, "samples": n, "tokens": n * length}
        times, stats = [], None
        try:
            for step in range(1 + steps):
                micro = collate([sample] * n)
                if cuda:
                    micro = micro.pin_memory()
                begin = time.perf_counter()
                stats = runner.start([micro]).stats()
                if cuda:
                    torch.cuda.synchronize()
                if step:
                    times.append(time.perf_counter() - begin)
        except torch.OutOfMemoryError as err:
            row.update(status="out of memory", error=str(err).splitlines()[0][:200])
            rows.append(row)
            print(json.dumps(row), flush=True)
            break
        finally:
            _release()
        step_s = sorted(times)[len(times) // 2]
        tflops = stats.flops / step_s / 1e12
        row.update(status="ok", step_s=step_s, tokens_per_s=n * length / step_s, tflops=tflops,
                   mfu=tflops / peak_tflops if peak_tflops else None, loss=stats.loss,
                   peak_mem_gb=max(stats.peak_mem_gb),
                   peak_tensor_gb=max(stats.peak_tensor_gb) if stats.peak_tensor_gb else None,
                   peak_reserved_gb=max(stats.peak_reserved_gb) if stats.peak_reserved_gb else None)
        rows.append(row)
        fits, last_ok = n * length, n
        print(json.dumps(row), flush=True)
    try:
        syncs = sync_report(runner, [collate([sample] * last_ok)]) if last_ok else {}
    except Exception as err:  # noqa: BLE001 - e.g. the engine after an out-of-memory step: the table stands
        syncs = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    table = _table(rows, preset, config.model.precision, length, loss, kernel)
    print(table + f"\nlargest size that fits: {fits} tokens per step\n"
          f"host syncs in one step (CUDA sync debug mode, by file): {syncs or 'none'}", flush=True)
    return {"rows": rows, "largest_tokens": fits, "syncs": syncs, "sample_tokens": length, "setup_s": setup_s,
            "attention": kernel, "optimizer": optimizer, "table": table, "model_dir": str(model_dir),
            "record": str(tmp / "data.jsonl"), "max_pixels": side * side if preset == "2b" else 0}


def _zero2_json() -> Path:
    return Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"


def _table(rows: list[dict], preset: str, precision: str, length: int, loss: str, kernel: str) -> str:
    lines = [f"{'Qwen3-VL-2B architecture' if preset == '2b' else 'the demo model'}, {precision}, 1 "
             f"{'GPU' if torch.cuda.is_available() else 'CPU rank'}, ZeRO-2 json, packed, sample {length} tokens, "
             f"loss {loss}, attention {kernel}",
             f"{'tokens/step':>12} {'samples':>8} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
             f"{'peak GB':>8} {'reserved':>9}  status"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['tokens']:>12} {r['samples']:>8} {'':>8} {'':>10} {'':>8} {'':>6} {'':>8} {'':>9}  "
                         f"{r['status']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        reserved = f"{r['peak_reserved_gb']:.1f}" if r["peak_reserved_gb"] is not None else "-"
        lines.append(f"{r['tokens']:>12} {r['samples']:>8} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
                     f"{r['tflops']:>8.1f} {mfu:>6} {r['peak_mem_gb']:>8.1f} {reserved:>9}  ok")
    return "\n".join(lines)
