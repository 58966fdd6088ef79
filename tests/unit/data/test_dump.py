"""`ds-vlm validate --dump`: each record as the model sees it, one JSON line: rendered text, learned spans, control
tokens, images as decoded, notes; a bad record as its error."""

from __future__ import annotations

import io
import json


def png(mode: str, size=(64, 32)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


def test_validate_dump_shows_what_the_model_sees(demo_dir, tmp_path, capsys):
    import ds_vlm.data.validate as validate

    (tmp_path / "a.png").write_bytes(png("RGBA"))
    rows = [
        {"id": 1, "messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "<image>Colour?"},
                               {"role": "assistant", "content": "Black.", "weight": 1}], "images": ["a.png"]},
        {"prompt": [{"role": "user", "content": "What?"}], "completion": [{"role": "assistant", "content": "Dark."}],
         "images": ["a.png"]},
        {"conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}],
         "images": ["gone.png"]},
        {"conversations": [{"from": "human", "value": "Never dumped"}, {"from": "gpt", "value": "y"}]},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dump.jsonl"
    rc = validate.main(["--model", str(demo_dir / "model"), "--train_data", str(data), "--workers", "0",
                        "--dump", str(out), "--dump_records", "3"])
    assert rc == 1 and f"{out}: 3 record(s) as the model sees them" in capsys.readouterr().out
    first, trl, bad = [json.loads(line) for line in out.read_text().splitlines()]
    assert (first["file"], first["record"]) == (str(data), 0)
    assert first["learned"] == ["Black.<|im_end|>"]  # the greeting opens the conversation: context, not learned
    assert "<|im_start|>assistant\nHi!<|im_end|>" in first["text"]
    assert "<|vision_start|><|image_pad|>×8<|vision_end|>Colour?" in first["text"]
    assert first["control_tokens"]["<|im_start|>"] == 3 and first["control_tokens"]["<|image_pad|>"] == 8
    assert first["images"] == [{"width": 64, "height": 32, "mode": "RGBA"}]
    assert first["notes"] == ["ignored key `id`", "an opening assistant turn (nothing before it to answer) kept as "
                                                  "context, not learned"]
    assert "<|image_pad|>×8<|vision_end|>What?" in trl["text"] and trl["learned"] == ["Dark.<|im_end|>"]
    assert trl["notes"] == ["images placed before the first user text (TRL's placement)"]
    assert bad["kind"] == "missing_image" and "d.jsonl record 2: missing_image: image file" in bad["error"]


def test_dump_shows_where_implicit_and_numbered_placeholders_put_the_images(demo_dir, tmp_path):
    from transformers import AutoProcessor

    from ds_vlm.data.dump import record_line
    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for

    (tmp_path / "wide.png").write_bytes(png("RGB", (64, 32)))
    (tmp_path / "tall.png").write_bytes(png("L", (32, 64)))
    ann = {"image": "wide.png", "conversations": [{"from": "human", "value": "Colour?"},
                                                  {"from": "gpt", "value": "B."}]}
    mmmu = {"messages": [{"role": "user", "content": "<image 2> or <image 1>?"},
                         {"role": "assistant", "content": "B."}], "images": ["wide.png", "tall.png"]}
    (tmp_path / "ann.jsonl").write_text(json.dumps(ann) + "\n" + json.dumps(mmmu) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"set": {"annotation": "ann.jsonl", "root": ""}}))
    encoder = Encoder(AutoProcessor.from_pretrained(demo_dir / "model"), adapter_for("qwen3_vl"), 512)
    records = RecordIndex(str(tmp_path / "meta.json"))
    internvl, numbered = record_line(records, encoder, 0), record_line(records, encoder, 1)
    assert "user\n<|vision_start|><|image_pad|>×8<|vision_end|>\nColour?<|im_end|>" in internvl["text"]
    assert internvl["notes"] == ["<image>\\n put before the first turn's text (InternVL's placement)"]
    assert [(i["width"], i["mode"]) for i in numbered["images"]] == [(32, "L"), (64, "RGB")]  # image 2 first
