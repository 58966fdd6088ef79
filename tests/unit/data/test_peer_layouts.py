"""Layouts of other projects, each a small real file written here and read as that project reads it: Mantis,
Gemini, Bedrock Converse, captions, conversations kept as JSON text in parquet, MMMU's numbered placeholders,
InternVL's and TRL's implicit placeholders."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from ds_vlm.data.formats import PLACED, DataError
from ds_vlm.data.formats_turns import NUMBERED
from ds_vlm.data.sources import RecordIndex
from unit.data.test_layouts import brief


def png(size=(8, 8), colour="red") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def samples(path: str, **kwargs) -> list:
    records = RecordIndex([path], **kwargs)
    return [records.sample(i) for i in range(len(records))]


def test_mantis_gemini_and_bedrock_records_read_as_their_apis_define_them(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    data = base64.b64encode(png(colour="blue")).decode()
    mantis = {"id": "m1", "images": [{"bytes": None, "path": "a.png"}, "a.png"],
              "conversation": [{"role": "user", "content": "<image><image>Same?"},
                               {"role": "assistant", "content": "Yes."}]}
    gemini = {"systemInstruction": {"role": "system", "parts": [{"text": "Be brief."}]},
              "contents": [{"role": "user", "parts": [{"text": "What colour?"},
                                                      {"inlineData": {"mimeType": "image/png", "data": data},
                                                       "videoMetadata": {}}]},
                           {"role": "model", "parts": [{"text": "Blue."}]}]}
    gemini_file = {"contents": [{"role": "user", "parts": [{"file_data": {"mime_type": "image/png",
                                                                          "file_uri": "a.png"}}, {"text": "And?"}]},
                                {"role": "model", "parts": [{"text": "Red."}]}]}
    bedrock = {"schemaVersion": "bedrock-conversation-2024", "system": [{"text": "Be brief."}],
               "messages": [{"role": "user", "content": [{"image": {"format": "png", "source": {"bytes": data}}},
                                                         {"text": "Colour?"}]},
                            {"role": "assistant", "content": [{"text": "Blue."}]}]}
    clip = {"contents": [{"role": "user", "parts": [{"fileData": {"mimeType": "video/mp4", "fileUri": "c.mp4"},
                                                     "videoMetadata": {"startOffset": "1.5s", "endOffset": "4s"}}]},
                         {"role": "model", "parts": [{"text": "A clip."}]}]}
    [video] = samples(write(tmp_path / "clip.jsonl", [clip]))
    assert (video.videos[0].path, video.videos[0].start, video.videos[0].end) == (str(tmp_path / "c.mp4"), 1.5, 4.0)
    got = samples(write(tmp_path / "peers.jsonl", [mantis, gemini, gemini_file, bedrock]))
    assert [brief(s) for s in got] == [
        ["user: <image><image>Same?", "assistant*: Yes."],
        ["system: Be brief.", "user: What colour?<image>", "assistant*: Blue."],
        ["user: <image>And?", "assistant*: Red."],
        ["system: Be brief.", "user: <image>Colour?", "assistant*: Blue."]]
    assert got[0].ignored == ("id",) and got[1].ignored == ("part.videoMetadata",) and got[3].ignored == ()
    assert got[1].images[0].data == got[3].images[0].data == png(colour="blue")
    assert got[2].images[0].path == str(tmp_path / "a.png")
    s3 = {**bedrock, "messages": [{"role": "user", "content": [
        {"image": {"format": "png", "source": {"s3Location": {"uri": "s3://bucket/a.png"}}}}, {"text": "?"}]},
        bedrock["messages"][1]]}
    with pytest.raises(DataError, match=r"record 0: bad_record: image 's3://bucket/a.png' is a URL"):
        samples(write(tmp_path / "s3.jsonl", [s3]))
    audio = {"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "audio/wav", "data": ""}}]},
                          {"role": "model", "parts": [{"text": "Hi."}]}]}
    with pytest.raises(DataError, match=r"unsupported_media: contents\[0\]: a audio/wav part"):
        samples(write(tmp_path / "audio.jsonl", [audio]))


def test_caption_pairs_take_the_configured_prompt(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    path = write(tmp_path / "captions.jsonl", [{"image": "a.png", "caption": "A red square."},
                                               {"images": ["a.png"], "text": "Red.", "url": "http://x"}])
    plain, prompted = samples(path), samples(path, caption_prompt="Describe the image.")
    assert [brief(s) for s in plain] == [["user: <image>", "assistant*: A red square."],
                                         ["user: <image>", "assistant*: Red."]]
    assert brief(prompted[0]) == ["user: <image>Describe the image.", "assistant*: A red square."]
    assert plain[1].ignored == ("url",)
    records = RecordIndex([path], caption_prompt="Describe the image.")  # the prompt is part of the cache key
    assert records.files[0].tag != RecordIndex([path]).files[0].tag


def test_a_conversation_kept_as_json_text_in_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Red."}]
    (tmp_path / "a.png").write_bytes(png())
    table = pa.Table.from_pylist([{"conversations": json.dumps(turns), "images": [{"bytes": png(), "path": None}]}])
    pq.write_table(table, tmp_path / "t.parquet")
    [sample] = samples(str(tmp_path / "t.parquet"))
    assert brief(sample) == ["user: <image>Colour?", "assistant*: Red."]
    assert sample.notes == ["'conversations' read from JSON text"]
    pq.write_table(pa.Table.from_pylist([{"conversations": json.dumps(turns), "images": '["a.png"]'}]),
                   tmp_path / "u.parquet")
    [sample] = samples(str(tmp_path / "u.parquet"))
    assert sample.images[0].path == str(tmp_path / "a.png") and len(sample.notes) == 2


def test_mmmu_numbered_placeholders_show_the_images_they_number(tmp_path):
    for name in ("one", "two"):
        (tmp_path / f"{name}.png").write_bytes(png())
    record = {"messages": [{"role": "user", "content": "Compare <image 2> with <image 1>."},
                           {"role": "assistant", "content": "B."}], "images": ["one.png", "two.png"]}
    [sample] = samples(write(tmp_path / "mmmu.jsonl", [record]))
    assert brief(sample) == ["user: Compare <image> with <image>.", "assistant*: B."]
    assert [Path(r.path).name for r in sample.images] == ["two.png", "one.png"] and sample.notes == [NUMBERED]
    for content, message in (("<image 3> and <image 1>", r"<image 3> but 2 image\(s\)"),
                             ("<image 2> only", r"image\(s\) \[1\] are never shown"),
                             ("<image 1> and <image>", "numbered <image N> and plain <image> placeholders mixed")):
        bad = {**record, "messages": [{"role": "user", "content": content}, record["messages"][1]]}
        with pytest.raises(DataError, match=f"placeholder_mismatch: {message}"):
            samples(write(tmp_path / "bad.jsonl", [bad]))


def test_internvl_and_trl_place_images_with_no_placeholder_as_their_projects_do(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png())
    write(tmp_path / "ann.jsonl", [{"id": 0, "image": "a.png", "conversations": [
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]}])
    (tmp_path / "meta.json").write_text(json.dumps({"set": {"root": "pics/", "annotation": "ann.jsonl"}}))
    [internvl] = samples_of(str(tmp_path / "meta.json"))
    assert brief(internvl) == ["user: <image>\nColour?", "assistant*: Red."]
    assert internvl.notes == [PLACED["internvl"]]
    with pytest.raises(DataError, match=r"placeholder_mismatch: 0 <image> placeholder\(s\) but 1 image\(s\) .*placed "
                                        r"only where the layout's project places them"):
        samples(str(tmp_path / "ann.jsonl"))  # the same file outside its meta: no project says where
    write(tmp_path / "ann.jsonl", [{"images": ["a.png", "a.png"], "conversations": [
        {"from": "human", "value": "Same?"}, {"from": "gpt", "value": "Yes."}]}])
    with pytest.raises(DataError, match=r"InternVL puts <image>\\n in front of a single image only"):
        samples_of(str(tmp_path / "meta.json"))
    trl = {"prompt": [{"role": "user", "content": "What colour?"}],
           "completion": [{"role": "assistant", "content": "Red."}], "images": ["pics/a.png"]}
    [sample] = samples(write(tmp_path / "trl.jsonl", [trl]))
    assert brief(sample) == ["user: <image>What colour?", "assistant*: Red."] and sample.notes == [PLACED["trl"]]


def samples_of(spec: str) -> list:
    records = RecordIndex(spec)
    return [records.sample(i) for i in range(len(records))]
