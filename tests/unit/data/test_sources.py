"""Files -> records: every container reads the same records, weighted sources, JSON lists indexed once, bad JSON
named."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from ds_vlm.data.formats import DataError
from ds_vlm.data.images import load_images
from ds_vlm.data.plan import epoch_order
from ds_vlm.data.sources import RecordFile, RecordIndex


def test_every_container_and_layout_reads_the_same_records(all_formats):
    for source in all_formats[:-1]:  # the last one mixes in bad records
        records = RecordIndex(str(source))
        first = records.sample(0)
        assert len(records) >= 8, source
        assert first.messages[-1]["role"] == "assistant", source
        assert load_images(first)[0].size == (64, 64), source


def test_weighted_sources_sample_by_weight(tmp_path):
    order = epoch_order(100, seed=1, epoch=0, source_sizes=[80, 20], weights=[0.25, 0.75])
    counts = Counter(i < 80 for i in order)
    assert counts[True] == 25 and counts[False] == 75  # 20 records upsampled to 75 draws
    assert set(i for i in order if i >= 80) == set(range(80, 100))
    spec = f"{tmp_path}/a.jsonl:0.7,{tmp_path}/b.parquet:0.3"
    from ds_vlm.data.specs import parse_spec

    assert [(s.path, s.weight) for s in parse_spec(spec)] == [(f"{tmp_path}/a.jsonl", 0.7),
                                                               (f"{tmp_path}/b.parquet", 0.3)]
    with pytest.raises(ValueError, match="every source or to none"):
        parse_spec(f"{tmp_path}/a.jsonl:0.7,{tmp_path}/b.jsonl")


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


def test_jsonl_and_parquet_give_the_same_tensors(encoder, demo_dir):
    data = demo_dir / "data"
    for i in (0, 5):
        a = RecordIndex([str(data / "train.jsonl")]).sample(i)
        b = RecordIndex([str(data / "train.parquet")]).sample(i)
        ea, eb = encoder.encode(a, load_images(a)), encoder.encode(b, load_images(b))
        assert ea.keys() == eb.keys()
        for key in ea:
            assert torch.equal(ea[key], eb[key]), key


def test_record_file_reports_bad_json(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"conversations": []}\n\n\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl record 1: bad_record: line 4: not valid JSON"):
        RecordFile(str(path))[1]  # blank lines are not records, but they are lines of the user's file


def test_a_json_list_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "é"}]}] * 2
    plain, bom = tmp_path / "plain.json", tmp_path / "bom.json"
    plain.write_text(json.dumps(rows), encoding="utf-8")
    bom.write_text(json.dumps(rows), encoding="utf-8-sig")
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert [RecordFile(str(bom))[i] for i in range(2)] == [RecordFile(str(plain))[i] for i in range(2)] == rows
