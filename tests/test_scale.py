"""Data at scale: preflight runs once per data file (a cache keyed by the file and everything that changes
encoding), JSON lists are indexed once instead of loaded whole, sample:N estimates, off skips and counts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ds_vlm.config import ConfigError, TrainConfig
from ds_vlm.data.batching import Collator, SFTDataset
from ds_vlm.data.encode import Encoder
from ds_vlm.data.preflight import KINDS, OK, Checks, check_records, preflight
from ds_vlm.data.sources import RecordFile, RecordIndex
from ds_vlm.models import adapter_for
from conftest import ROOT, read_metrics, run_train


def _encoder(model: Path, max_length: int = 256, processor=None) -> Encoder:
    from transformers import AutoProcessor

    return Encoder(processor or AutoProcessor.from_pretrained(model), adapter_for("qwen3_vl"), max_length)


@pytest.fixture
def data(demo_dir, tmp_path) -> Path:
    """The demo's train records in two JSONL files (24 each), next to its images."""
    shutil.copytree(demo_dir / "data" / "images", tmp_path / "images")
    lines = (demo_dir / "data" / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:24]))
    (tmp_path / "b.jsonl").write_text("".join(lines[24:]))
    return tmp_path


def _check(data: Path, encoder: Encoder, cache: Path, mode: str = "cached") -> tuple[Checks, str]:
    return preflight(RecordIndex(f"{data / 'a.jsonl'},{data / 'b.jsonl'}"), encoder, mode, str(cache))


def _same(x: Checks, y: Checks) -> bool:
    return all(np.array_equal(getattr(x, c), getattr(y, c)) for c in ("index", *Checks.COLUMNS))


def test_preflight_is_cached_per_file_and_invalidated_by_what_changes_encoding(demo_dir, data, tmp_path):
    cache, encoder = tmp_path / "cache", _encoder(demo_dir / "model")
    first, said = _check(data, encoder, cache)
    assert said == f"48 records, 48 checked in {said.split(' checked in ')[1]}" and "from the cache" not in said
    assert (first.kind == OK).all() and (first.n_tokens > first.n_targets).all() and len(list(cache.rglob("*.npz"))) == 2
    # the same with the per-record objects: the columns hold what check_records finds
    slow = Checks.of(check_records(RecordIndex(f"{data / 'a.jsonl'},{data / 'b.jsonl'}"), encoder))
    assert _same(first, slow)

    again, said = _check(data, encoder, cache)
    assert said.startswith("48 records, 48 from the cache") and "checked" not in said and _same(first, again)

    # one record of b edited: b is checked again, a still comes from the cache
    lines = (data / "b.jsonl").read_text().splitlines(keepends=True)
    record = json.loads(lines[3])
    record["conversations"][1]["value"] += " It is a very nice shape indeed."
    lines[3] = json.dumps(record) + "\n"
    (data / "b.jsonl").write_text("".join(lines))
    edited, said = _check(data, encoder, cache)
    assert "24 from the cache" in said and "24 checked" in said
    changed = np.flatnonzero(edited.n_tokens != first.n_tokens).tolist()
    assert changed == [24 + 3] and edited.n_targets[27] > first.n_targets[27]

    # --max_length, the chat template and the tokenizer are part of the key: everything is checked again
    _, said = _check(data, _encoder(demo_dir / "model", max_length=300), cache)
    assert "48 checked" in said and "from the cache" not in said
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_dir / "model")
    processor.chat_template = processor.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
    _, said = _check(data, _encoder(demo_dir / "model", processor=processor), cache)
    assert "48 checked" in said
    processor = AutoProcessor.from_pretrained(demo_dir / "model")
    processor.tokenizer.add_tokens(["pokemonish"])
    _, said = _check(data, _encoder(demo_dir / "model", processor=processor), cache)
    assert "48 checked" in said
    # and --preflight full checks again although the cache holds the entries
    _, said = _check(data, encoder, cache, "full")
    assert "48 checked" in said and "from the cache" not in said


def test_a_json_list_is_indexed_once_and_reads_like_jsonl(demo_dir, data, tmp_path):
    records = [json.loads(line) for line in (data / "a.jsonl").read_text().splitlines()]
    records[5]["conversations"][1]["value"] = "Ünïcödé, \"quoted\" ] and , inside"
    (data / "a.json").write_text(json.dumps(records, indent=2, ensure_ascii=False))
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n   \n")  # blank lines skipped
    as_list, as_lines = RecordFile(str(data / "a.json"), str(tmp_path / "c")), RecordFile(str(data / "a.jsonl"))
    assert len(as_list) == len(as_lines) == 24
    assert [as_list[i] for i in range(24)] == [as_lines[i] for i in range(24)] == records
    (index,) = (tmp_path / "c" / "index").glob("*.jsonl")  # built once, reused by the next opener
    built = index.stat().st_mtime_ns
    assert len(RecordFile(str(data / "a.json"), str(tmp_path / "c"))) == 24 and index.stat().st_mtime_ns == built
    assert not hasattr(as_list, "_rows") and as_list._offsets.dtype == np.int64
    (data / "b.json").write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="b.json: a .json data file must hold a list of records"):
        RecordFile(str(data / "b.json"), str(tmp_path / "c"))


def _with_bad(data: Path, every: int) -> Path:
    """a.jsonl with every `every`-th record's image missing."""
    lines = (data / "a.jsonl").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        record = json.loads(line)
        if i % every == 0:
            record["images"] = ["images/nope.png"]
        out.append(json.dumps(record))
    (data / "a.jsonl").write_text("\n".join(out) + "\n")
    return data / "a.jsonl"


def test_sample_checks_n_per_file_and_estimates_the_rest(demo_dir, data, tmp_path):
    _with_bad(data, every=2)  # 12 of a's 24 records are bad
    checks, said = _check(data, _encoder(demo_dir / "model"), tmp_path / "cache", "sample:8")
    counts = checks.counts()
    assert counts["unchecked"] == 32 and counts["ok"] + counts["missing_image"] == 16 and counts["missing_image"] >= 1
    bad = counts["missing_image"]
    assert f"sample of 16 of 48: {bad} bad ({bad / 16:.1%}), estimate ~{round(bad / 16 * 48)} bad records" in said
    assert not list((tmp_path / "cache").rglob("*.npz"))  # a sample is never cached as if it were the file


def test_off_leaves_bad_records_out_of_batches_and_counts_them(demo_dir, data):
    path = _with_bad(data, every=10)  # records 0, 10, 20
    encoder = _encoder(demo_dir / "model")
    checks, said = preflight(RecordIndex([str(path)]), encoder, "off")
    assert checks.counts() == {"unchecked": 24} and "none checked" in said
    dataset = SFTDataset(RecordIndex([str(path)]), encoder, checks.index, skip_bad=True)
    batch, meta = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())([dataset[i] for i in (9, 10, 11)])
    assert meta["samples"] == 2 and batch["input_ids"].shape[0] == 2
    (message,) = meta["bad"]
    assert f"{path} record 10: missing_image" in message
    with pytest.raises(Exception, match="record 10: missing_image"):
        SFTDataset(RecordIndex([str(path)]), encoder, checks.index)[10]  # checked data: a bad record is a bug


def test_more_bad_records_than_max_bad_stop_the_run(tmp_path):
    from ds_vlm.metrics import RunLog
    from ds_vlm.train import Progress, TooManyBadRecords, Trainer

    trainer = Trainer(TrainConfig(max_bad=2, output_dir=str(tmp_path)))
    trainer.log, trainer.progress = RunLog(str(tmp_path), enabled=True), Progress()
    trainer.bad_records_met(step=3, new=2)  # 2 is within --max_bad 2: logged, the run goes on
    with pytest.raises(TooManyBadRecords, match="3 records met in training were bad, more than --max_bad 2"):
        trainer.bad_records_met(step=4, new=1)
    trainer.log.close()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["new"], e["total"]) for e in events if e.get("event") == "bad_records"] == [(3, 2, 2), (4, 1, 3)]


def test_preflight_flags_are_checked():
    assert TrainConfig(model="m", train_data="d", preflight="sample:100").validate(for_training=False)
    for bad in ("sample", "sample:0", "fast"):
        with pytest.raises(ConfigError, match="--preflight"):
            TrainConfig(model="m", train_data="d", preflight=bad).validate(for_training=False)
    with pytest.raises(ConfigError, match="--max_tokens_per_batch needs every record's length"):
        TrainConfig(model="m", train_data="d", preflight="off", max_tokens_per_batch=4096).validate(for_training=False)
    assert KINDS[OK] == "ok" and KINDS[-1] == "unchecked"


@pytest.mark.dist
def test_two_ranks_with_preflight_off_skip_and_count_a_bad_record(demo_dir, data, tmp_path):
    """A 2-rank run that trusts its data (--preflight off) meets a record whose image is missing: the record is
    left out and named, the ranks agree on the count, the run goes on to the end."""
    lines = (data / "a.jsonl").read_text().splitlines()[:16]
    record = json.loads(lines[7])
    record["images"] = ["images/nope.png"]
    lines[7] = json.dumps(record)
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    proc = run_train(["--model", str(demo_dir / "model"), "--train_data", str(data / "a.jsonl"), "--deepspeed",
                      str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out), "--epochs", "1",
                      "--micro_batch_size", "2", "--num_workers", "1", "--preflight", "off", "--max_bad", "1",
                      "--export_hf", "false", "--dist_timeout_s", "120"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    assert "none checked (--preflight off" in proc.stderr
    assert f"left out a bad record: {data / 'a.jsonl'} record 7: missing_image" in proc.stderr
    steps = read_metrics(out)
    assert len(steps) == 4 and sum(round(r["samples_per_s"] * r["step_time_s"]) for r in steps) == 15
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["total"] for e in events if e.get("event") == "bad_records"] == [1]
    assert os.path.exists(out / "checkpoints")
