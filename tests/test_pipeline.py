"""Data pipeline: sources and formats, pixel bounds, truncation, token-budget batches, validate,
and a loss that does not depend on how the global batch is split."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_train
from test_data import _write_bad_set

from ds_vlm.data.batching import BatchPlan, TokenBudgetPlan, epoch_order
from ds_vlm.data.encode import IGNORE_INDEX, Encoder, set_pixel_bounds
from ds_vlm.data.formats import DataError, to_sample
from ds_vlm.data.images import load_images
from ds_vlm.data.sources import RecordIndex
from ds_vlm.models import adapter_for


@pytest.fixture(scope="module")
def processor(demo_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(demo_dir / "model")


@pytest.fixture(scope="module")
def all_formats(demo_dir, tmp_path_factory) -> list[Path]:
    """The demo records in every supported layout and container, 8 records each."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("formats")
    data = demo_dir / "data"
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:8]]
    images = [str(data / r["images"][0]) for r in rows]
    answers = [r["conversations"][1]["value"] for r in rows]

    def write_jsonl(name, records):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return out / name

    llava = [{"image": im, "conversations": [{"from": "human", "value": "<image>\nWhat is in this picture?"},
                                             {"from": "gpt", "value": a}]} for im, a in zip(images, answers)]
    (out / "llava.json").write_text(json.dumps(llava))
    messages = write_jsonl("messages.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>What is in this picture?"},
                      {"role": "assistant", "content": a}], "images": [im]} for im, a in zip(images, answers)])
    openai = write_jsonl("openai.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": im},
                                                   {"type": "text", "text": "What is in this picture?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": a}]}]}
        for im, a in zip(images, answers)] + [
        {"messages": [{"role": "user", "content": "Say a caption."}, {"role": "assistant", "content": answers[0]}]}])
    table = pq.read_table(data / "train.parquet").slice(0, 8)
    (out / "parquet_dir" / "part").mkdir(parents=True)
    pq.write_table(table.slice(0, 4), out / "parquet_dir" / "part" / "a.parquet")
    pq.write_table(table.slice(4, 4), out / "parquet_dir" / "b.parquet")
    saved = datasets.Dataset(pa.Table.from_pylist(
        [{**r, "images": [{"bytes": Path(im).read_bytes(), "path": None}]} for r, im in zip(rows, images)]))
    saved.save_to_disk(str(out / "saved"))
    swift = write_jsonl("swift.jsonl", [
        {"system": "Be brief.", "query": "<image>What is in this picture?", "response": a, "images": [im]}
        for im, a in zip(images, answers)])
    (out / "alpaca.json").write_text(json.dumps([
        {"instruction": "<image>What is in this picture?", "input": "", "output": a, "images": [im]}
        for im, a in zip(images, answers)]))
    # LLaMA-Factory's newer typed parts, a base64 image, and two records that must not train: audio, a web URL
    url = "data:image/png;base64," + base64.b64encode(Path(images[0]).read_bytes()).decode()
    mixed = write_jsonl("mixed_peers.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "value": images[1]},
                                                   {"type": "text", "value": "What is in this picture?"}]},
                      {"role": "assistant", "content": [{"type": "text", "value": answers[1]}]}]},
        {"messages": [{"role": "user", "content": "<audio>What is said?"}, {"role": "assistant", "content": "Hi."}],
         "audios": ["speech.wav"]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "What is in this picture?"}]},
                      {"role": "assistant", "content": answers[0]}]},
        {"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                           {"from": "gpt", "value": answers[2]}], "images": ["http://example.com/a.png"]},
    ])
    return [data / "train.jsonl", out / "llava.json", messages, openai, out / "parquet_dir", out / "saved", swift,
            out / "alpaca.json", mixed]


def test_every_container_and_layout_reads_the_same_records(all_formats):
    for source in all_formats[:-1]:  # the last one mixes in bad records
        records = RecordIndex(str(source))
        first = records.sample(0)
        assert len(records) >= 8, source
        assert first.messages[-1]["role"] == "assistant", source
        assert load_images(first)[0].size == (64, 64), source


@pytest.mark.dist
def test_every_format_trains_end_to_end(all_formats, demo_dir, tmp_path):
    out = tmp_path / "run"
    spec = ",".join(str(p) for p in all_formats)
    proc = run_train(["--model", str(demo_dir / "model"), "--train_data", spec, "--deepspeed",
                      str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out), "--max_steps", "6",
                      "--micro_batch_size", "4", "--lr", "2e-3", "--warmup_ratio", "0", "--num_workers", "1",
                      "--export_hf", "false", "--bad_records", "skip"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 48 demo records + 7 x 8 + one text-only OpenAI record + 2 good peer records; the 2 bad ones named
    assert "records: ok 107, unsupported_media 1, bad_record 1" in proc.stderr
    mixed = all_formats[-1]
    assert f"{mixed} record 1: unsupported_media: turn 0 (user): an <audio> placeholder" in proc.stderr
    assert f"{mixed} record 3: bad_record: image 'http://example.com/a.png' is a URL" in proc.stderr
    rows = read_metrics(out)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]


def test_weighted_sources_sample_by_weight(tmp_path):
    order = epoch_order(100, seed=1, epoch=0, source_sizes=[80, 20], weights=[0.25, 0.75])
    counts = Counter(i < 80 for i in order)
    assert counts[True] == 25 and counts[False] == 75  # 20 records upsampled to 75 draws
    assert set(i for i in order if i >= 80) == set(range(80, 100))
    spec = f"{tmp_path}/a.jsonl:0.7,{tmp_path}/b.parquet:0.3"
    from ds_vlm.data.sources import parse_sources

    assert parse_sources(spec) == [(f"{tmp_path}/a.jsonl", 0.7), (f"{tmp_path}/b.parquet", 0.3)]
    with pytest.raises(ValueError, match="every source or to none"):
        parse_sources(f"{tmp_path}/a.jsonl:0.7,{tmp_path}/b.jsonl")


def test_max_pixels_and_min_pixels_change_the_image_tokens(processor, demo_dir):
    import copy

    sample = RecordIndex(str(demo_dir / "data" / "train.jsonl")).sample(0)
    image_tokens = {}
    for bounds in ((0, 0), (0, 32 * 32), (128 * 128, 256 * 256)):
        p = copy.deepcopy(processor)
        set_pixel_bounds(p, *bounds)
        encoded = Encoder(p, adapter_for("qwen3_vl"), 512).encode(sample, load_images(sample))
        image_tokens[bounds] = int(encoded["image_grid_thw"].prod() // 4)
    assert image_tokens == {(0, 0): 16, (0, 32 * 32): 4, (128 * 128, 256 * 256): 64}
    with pytest.raises(ValueError, match="> --max_pixels"):
        set_pixel_bounds(copy.deepcopy(processor), 4096, 1024)


def test_truncation_never_cuts_an_image_and_keeps_an_answer(processor, demo_dir):
    adapter = adapter_for("qwen3_vl")
    image = str(demo_dir / "data" / "images" / "train_00000.png")
    record = {"conversations": [{"from": "human", "value": "Look: <image> and <image> now"},
                                {"from": "gpt", "value": "A red circle. " * 8}], "images": [image, image]}
    sample = to_sample(record, "t.jsonl", 7)
    full = Encoder(processor, adapter, 1024).encode(sample, load_images(sample))
    ids = full["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    second_image_start = [i for i in range(1, len(ids)) if ids[i] == image_id and ids[i - 1] != image_id][1]
    # a cut inside the second image: everything from its <|vision_start|> goes, with its pixels
    cut_inside = second_image_start + 5
    record2 = {**record, "conversations": [record["conversations"][0], {"from": "gpt", "value": "A red circle."}]}
    with pytest.raises(DataError, match="no answer token"):
        Encoder(processor, adapter, cut_inside, "truncate").encode(sample, load_images(sample))
    # the answer of a two-turn record survives a cut inside the second image
    two_turn = to_sample({"conversations": [{"from": "human", "value": "<image>What?"},
                                            {"from": "gpt", "value": "A red circle."},
                                            {"from": "human", "value": "And this <image>?"},
                                            {"from": "gpt", "value": "A red circle too."}],
                          "images": [image, image]}, "t.jsonl", 8)
    whole = Encoder(processor, adapter, 1024).encode(two_turn, load_images(two_turn))
    wids = whole["input_ids"][0]
    starts = [i for i in range(1, len(wids)) if wids[i] == image_id and wids[i - 1] != image_id]
    cut = Encoder(processor, adapter, starts[1] + 3, "truncate").encode(two_turn, load_images(two_turn))
    assert cut["input_ids"].shape[1] == starts[1] - 1  # before <|vision_start|> of image 2
    assert cut["image_grid_thw"].shape[0] == 1 and cut["pixel_values"].shape[0] == int(whole["image_grid_thw"][0].prod())
    assert (cut["input_ids"] == image_id).sum() == 16
    assert processor.tokenizer.decode(cut["input_ids"][0][cut["labels"][0] != IGNORE_INDEX]) == "A red circle.<|im_end|>"
    with pytest.raises(DataError, match="too_long"):
        Encoder(processor, adapter, 20, "error").encode(to_sample(record2, "t.jsonl", 9), load_images(sample))


def test_token_budget_batches_cover_the_epoch_and_pad_less():
    import random

    rng = random.Random(0)
    lengths = [rng.choice([40, 60, 90, 150, 300]) + rng.randint(0, 20) for _ in range(400)]
    budget = 1280
    plan = TokenBudgetPlan(len(lengths), 4, 1, 2, seed=0, lengths=lengths, max_tokens=budget)
    fixed = BatchPlan(len(lengths), 4, 1, 2, seed=0)

    def computed(p) -> tuple[int, list[int]]:
        total, seen = 0, []
        for step in range(p.steps_per_epoch):
            for mb in p.micro_batches(step, None):
                seen += mb
                total += max((lengths[i] for i in mb), default=0) * len(mb)
        return total, seen

    budget_tokens, seen = computed(plan)
    fixed_tokens, _ = computed(fixed)
    assert sorted(seen) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in mb) * len(mb) <= budget
               for s in range(plan.steps_per_epoch) for mb in plan.micro_batches(s, None) if len(mb) > 1)
    assert budget_tokens <= 0.75 * fixed_tokens, (budget_tokens, fixed_tokens)
    # later epochs pack their own order into a step or two more or fewer: every step still holds samples,
    # every epoch holds each sample once (a step with no sample at all once divided the loss by zero)
    epoch_steps = [plan.epoch_steps(e) for e in range(6)]
    assert len(set(epoch_steps)) > 1 and plan.steps_in(6) == sum(epoch_steps)
    start = 0
    for steps in epoch_steps:
        batches = [plan.micro_batches(s, None) for s in range(start, start + steps)]
        assert all(any(mb for mb in step) for step in batches)
        assert sorted(i for step in batches for mb in step for i in mb) == list(range(len(lengths)))
        start += steps


@pytest.mark.dist
def test_validate_finds_and_names_every_planted_defect(demo_dir, tmp_path):
    path = _write_bad_set(tmp_path, demo_dir)
    good = json.loads(path.read_text().splitlines()[0])
    with open(path, "a") as f:
        f.write(json.dumps({**good, "conversations": [good["conversations"][0],
                                                      {"from": "gpt", "value": "A red circle. " * 30}]}) + "\n")
    cmd = [sys.executable, "-m", "ds_vlm.validate", "--model", str(demo_dir / "model"), "--train_data", str(path),
           "--max_length", "64", "--workers", "1", "--micro_batch_size", "2", "--world_size", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout
    assert "records: ok 2, missing_image 1, unreadable_image 1, placeholder_mismatch 1, no_assistant_turn 1, " \
           "too_long 1" in out
    for index, kind in ((1, "missing_image"), (2, "unreadable_image"), (3, "placeholder_mismatch"),
                        (4, "no_assistant_turn"), (6, "too_long")):
        assert f"{path} record {index}: {kind}" in out
    assert "steps per epoch: 1 (2 usable samples, global batch 4 = 2 x 1 x 2)" in out
    assert "token length" in out and "image tokens per sample" in out
    assert "ignored key `id` in 1 record " in out
    proc = subprocess.run(cmd + ["--max_bad", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout


def _normalisation_data(demo_dir: Path, tmp: Path) -> Path:
    """4 samples whose answers have very different lengths (1 to ~40 label tokens)."""
    base = json.loads((demo_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    image = str(demo_dir / "data" / base["images"][0])
    answers = ["A red circle.", "A blue square. " * 8, "Red.", "A green triangle. A yellow circle. " * 3]
    records = [{"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                                  {"from": "gpt", "value": a.strip()}], "images": [image]} for a in answers]
    path = tmp / "four.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.dist
def test_loss_and_gradients_do_not_depend_on_the_split(demo_dir, tmp_path):
    """One step on the same 4 samples: (1 rank, mb 4, accum 1), (1 rank, mb 1, accum 4), (2 ranks, mb 1,
    accum 2). With Adam's eps = 1 the first update is lr * g / (|g| + 1), one-to-one in g (unlike the usual
    eps, where it is sign(g)): the exported weights carry the gradient, so equal weights mean equal gradients."""
    from safetensors.torch import load_file

    data = _normalisation_data(demo_dir, tmp_path)
    results = {}
    for name, ranks, micro, accum in (("1x4x1", 1, 4, 1), ("1x1x4", 1, 1, 4), ("2x1x2", 2, 1, 2)):
        out = tmp_path / name
        proc = run_train(["--model", str(demo_dir / "model"), "--train_data", str(data), "--deepspeed",
                          str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out), "--max_steps", "1",
                          "--micro_batch_size", str(micro), "--grad_accum", str(accum), "--lr", "1.0",
                          "--adam_eps", "1", "--warmup_ratio", "0", "--grad_clip", "0", "--train_vision", "all",
                          "--num_workers", "0"], nprocs=ranks)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (row,) = read_metrics(out)
        results[name] = (row["loss"], row["grad_norm"], load_file(out / "hf" / "model.safetensors"))
    initial = load_file(demo_dir / "model" / "model.safetensors")
    ref_loss, ref_norm, ref_weights = results["1x4x1"]
    for name, (loss, norm, weights) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        assert norm == pytest.approx(ref_norm, rel=1e-4), name
        for key, value in ref_weights.items():
            delta, ref_delta = weights[key] - initial[key], value - initial[key]
            torch.testing.assert_close(delta, ref_delta, rtol=1e-4, atol=1e-7, msg=f"{name} {key}")
    moved = sum(int((ref_weights[k] != initial[k]).sum()) for k in ref_weights)
    assert moved > 100_000  # the update is not trivially zero
