"""WebDataset tar shards: samples grouped by key, read by offset from an index built once in the data cache, named
by a range or a glob; the members a record does not read are reported."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from ds_vlm.data.containers import DataFileError
from ds_vlm.data.sources import RecordIndex
from unit.data.test_layouts import brief


def png(colour: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, "PNG")
    return out.getvalue()


def shard(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_read_by_offset_from_a_cached_index(tmp_path):
    chat = {"conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Blue."}]}
    (tmp_path / "shards").mkdir()
    shard(tmp_path / "shards" / "train-000.tar", [
        ("s/000.png", png("red")), ("s/000.txt", b"A red square.\n"),
        ("s/001.png", png("blue")), ("s/001.json", json.dumps(chat).encode()),
        ("s/002.jpg", png("green")), ("s/002.txt", b"Green."), ("s/002.json", b'{"url": "http://x", "width": 8}')])
    shard(tmp_path / "shards" / "train-001.tar", [("003.0.png", png("red")), ("003.1.png", png("blue")),
                                                  ("003.caption", b"Two squares."), ("003.cls", b"7")])
    cache = tmp_path / "cache"
    spec = str(tmp_path / "shards" / "train-{000..001}.tar")
    records = RecordIndex(spec, cache_dir=str(cache), caption_prompt="Describe.")
    got = [records.sample(i) for i in range(len(records))]
    assert [brief(s) for s in got] == [
        ["user: <image>Describe.", "assistant*: A red square."], ["user: <image>Colour?", "assistant*: Blue."],
        ["user: <image>Describe.", "assistant*: Green."], ["user: <image><image>Describe.", "assistant*: Two squares."]]
    assert got[1].images[0].data == png("blue") and got[1].images[0].path.endswith("train-000.tar/s/001.png")
    assert [s.ignored for s in got] == [(), (), ("json",), ("cls",)]
    assert [(s.source.rsplit("/", 1)[1], s.index) for s in got] == [("train-000.tar", 0), ("train-000.tar", 1),
                                                                     ("train-000.tar", 2), ("train-001.tar", 0)]
    assert len(list((cache / "index").glob("*.jsonl"))) == 2
    assert len(RecordIndex(str(tmp_path / "shards" / "*.tar"), cache_dir=str(cache))) == 4  # the same indexes
    with pytest.raises(FileNotFoundError, match=r"train-\{000..002\}.tar: 1 of its 3 files do not exist "
                                                r"\(.*train-002.tar\)"):
        RecordIndex(str(tmp_path / "shards" / "train-{000..002}.tar"), cache_dir=str(cache))
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(DataFileError, match="x.tar.gz: a compressed tar cannot be read by offset; decompress it"):
        RecordIndex([str(tmp_path / "x.tar.gz")], cache_dir=str(cache))
