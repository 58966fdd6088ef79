"""Data files read through a conversion into the data cache (compressed JSONL, CSV/TSV, JSON lists), and the
file-level problems named with the file: encodings, line endings, empty files."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from ds_vlm.data.containers import DataFileError
from ds_vlm.data.sources import RecordIndex
from ds_vlm.data.specs import SpecError

RECORDS = [{"conversations": [{"from": "human", "value": f"Question {i}? café"}, {"from": "gpt", "value": f"A{i}."}]}
           for i in range(3)]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def texts(records: RecordIndex) -> list[str]:
    return [records.sample(i).messages[0]["content"][0]["text"] for i in range(len(records))]


def test_compressed_jsonl_is_indexed_once_into_the_data_cache(tmp_path, monkeypatch):
    import zstandard

    plain = tmp_path / "a.jsonl"
    plain.write_bytes(jsonl(RECORDS))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(RECORDS)))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(RECORDS)))
    cache = tmp_path / "cache"
    expected = texts(RecordIndex([str(plain)]))
    for name in ("a.jsonl.gz", "a.jsonl.zst"):
        records = RecordIndex([str(tmp_path / name)], cache_dir=str(cache))
        assert texts(records) == expected and records.files[0].path == str(tmp_path / name)
    assert len(list((cache / "index").glob("*.jsonl"))) == 2  # one decompressed copy each, reused after
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataFileError, match=r"bad.jsonl.gz: cannot decompress it \(BadGzipFile"):
        RecordIndex([str(tmp_path / "bad.jsonl.gz")], cache_dir=str(cache))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # not installed: refused by name, with the fix
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(RECORDS)))
    with pytest.raises(DataFileError, match=r"b.jsonl.zst: a zstd-compressed file needs the `zstandard` package"):
        RecordIndex([str(tmp_path / "b.jsonl.zst")], cache_dir=str(cache))


def test_csv_and_tsv_rows_are_records_with_json_cells_parsed(tmp_path):
    (tmp_path / "pairs.tsv").write_text("image\tcaption\nimg/a.png\tA red square.\nimg/b.png\tA blue disc.\n")
    (tmp_path / "chat.csv").write_text(
        'id,images,conversations\n7,"[""x.png""]","[{""from"": ""human"", ""value"": ""<image>Hi, there""}, '
        '{""from"": ""gpt"", ""value"": ""Hello.""}]"\n')
    pairs = RecordIndex([str(tmp_path / "pairs.tsv")], caption_prompt="Describe it.")
    sample = pairs.sample(1)
    assert [[p.get("text", "<image>") for p in m["content"]] for m in sample.messages] == [
        ["<image>", "Describe it."], ["A blue disc."]]
    assert sample.images[0].path == str(tmp_path / "img" / "b.png") and sample.messages[1]["learn"]
    chat = RecordIndex([str(tmp_path / "chat.csv")]).sample(0)
    assert chat.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Hi, there"}]
    assert chat.ignored == ("id",) and chat.images[0].path == str(tmp_path / "x.png")
    (tmp_path / "ragged.csv").write_text("image,caption\na.png,one,two\n")
    with pytest.raises(DataFileError, match=r"ragged.csv: row 1 has more cells than the header"):
        RecordIndex([str(tmp_path / "ragged.csv")])


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"empty.jsonl: the file is empty \(0 bytes\): no records"),
    ("blank.jsonl", b"\n \n", r"blank.jsonl: the file is empty \(only whitespace\)"),
    ("mac.jsonl", jsonl(RECORDS).replace(b"\n", b"\r"), r"mac.jsonl: CR-only line endings .*convert them to LF"),
    ("utf16.jsonl", jsonl(RECORDS).decode().encode("utf-16"), r"utf16.jsonl: encoded as UTF-16 LE \(a byte-order"),
    ("utf32.jsonl", jsonl(RECORDS).decode().encode("utf-32"), r"utf32.jsonl: encoded as UTF-32 LE"),
    ("nobom.jsonl", jsonl(RECORDS).decode().encode("utf-16-le"), r"nobom.jsonl: holds NUL bytes"),
    ("cp1252.json", json.dumps(RECORDS, ensure_ascii=False).encode("cp1252"),
     r"cp1252.json: not UTF-8: byte 0xe9 at byte 63, line 1 \(cp1252 would read it as .*café.*iconv"),
    ("empty.json", b"[]", r"empty.json: no records in it"),
    ("list.jsonl", json.dumps(RECORDS, indent=1).encode(), r"list.jsonl: holds a JSON list, not one record a line"),
    ("lines.json", jsonl(RECORDS), r"lines.json: not valid JSON \(Extra data.*it looks like JSON Lines .*name it "
                                   r"\.jsonl"),
])
def test_file_level_problems_are_named_with_the_file_and_the_fix(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises((DataFileError, SpecError), match=message):  # a .json goes through the mixture sniffing first
        RecordIndex(str(path), cache_dir=str(tmp_path / "cache"))


def test_a_bom_is_read_and_a_bad_byte_in_a_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(RECORDS))
    assert len(RecordIndex([str(path)])) == 3
    later = tmp_path / "later.jsonl"
    later.write_bytes(jsonl(RECORDS[:2]) + jsonl(RECORDS[2:]).decode().encode("cp1252"))
    with pytest.raises(DataFileError, match=r"later.jsonl: not UTF-8: byte 0xe9 at byte 266, line 3 \(cp1252"):
        RecordIndex([str(later)])
    later.write_bytes(jsonl(RECORDS[:2] * 400) + jsonl(RECORDS[2:]).decode().encode("cp1252"))  # past the head
    records = RecordIndex([str(later)])
    with pytest.raises(ValueError, match=r"later.jsonl record 800: bad_record: line 801: not UTF-8: byte 0xe9 "
                                         r"at column \d+ \(cp1252"):
        records.sample(800)


def test_validate_refuses_an_empty_file_as_the_trainer_does(demo_dir, tmp_path, capsys):
    import ds_vlm.data.validate as validate

    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    rc = validate.main(["--model", str(demo_dir / "model"), "--train_data", str(empty), "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "empty.jsonl: the file is empty (0 bytes): no records" in err and "Traceback" not in err


def test_mixture_sniffing_names_a_json_file_it_cannot_decode(tmp_path):
    info = tmp_path / "dataset_info.json"
    info.write_bytes('{"a": {"file_name": "x.json", "columns": {"prompt": "é"}}}'.encode("cp1252"))
    with pytest.raises(SpecError, match=r"dataset_info.json: not UTF-8: byte 0xe9"):
        RecordIndex(f"{info}#a")


def test_a_json_list_converted_once(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps(RECORDS))
    assert texts(RecordIndex(str(path), cache_dir=str(tmp_path / "c"))) == [f"Question {i}? café" for i in range(3)]
    assert Path(RecordIndex(str(path), cache_dir=str(tmp_path / "c")).files[0].file._lines).parent.name == "index"
