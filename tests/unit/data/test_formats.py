"""Records -> samples: every layout and every peer spelling becomes the same Sample; what is refused and what is
reported."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from fixtures.encoding import check

from ds_vlm.data.encode import IGNORE_INDEX, Encoder
from ds_vlm.data.formats import DataError, to_sample
from ds_vlm.data.images import load_images
from ds_vlm.data.preflight import summarize
from ds_vlm.data.sources import RecordIndex
from ds_vlm.models import adapter_for


def test_every_layout_becomes_the_same_sample(demo_dir, tmp_path):
    image = demo_dir / "data" / "images" / "train_00000.png"
    raw = image.read_bytes()
    answer = "A red circle."
    layouts = {
        "sharegpt": {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": answer}],
                     "images": ["images/train_00000.png"]},
        "messages": {"messages": [{"role": "user", "content": "<image>What?"},
                                  {"role": "assistant", "content": answer}],
                     "images": [str(image)]},
        "llava": {"image": "images/train_00000.png",
                  "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": answer}]},
        "openai": {"messages": [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                             {"type": "text", "text": "What?"}]},
                                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]},
        "bytes": {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": answer}],
                  "images": [{"bytes": raw, "path": None}]},
    }
    source = str(demo_dir / "data" / "any.jsonl")
    for name, record in layouts.items():
        sample = to_sample(record, source, 0)
        assert [m["role"] for m in sample.messages] == ["user", "assistant"], name
        assert sample.messages[0]["content"][0] == {"type": "image"}, name
        assert sample.messages[1]["content"] == [{"type": "text", "text": answer}], name
        (img,) = load_images(sample)
        assert img.size == (64, 64), name


ANSWER = "A red circle."


@pytest.fixture(scope="module")
def image(demo_dir) -> Path:
    return demo_dir / "data" / "images" / "train_00000.png"


def _source(demo_dir) -> str:
    return str(demo_dir / "data" / "peer.jsonl")


def _learned(encoder, sample) -> str:
    encoded = encoder.encode(sample, load_images(sample))
    return encoder.tokenizer.decode(encoded["input_ids"][0][encoded["labels"][0] != IGNORE_INDEX])


def test_content_parts_in_every_peer_spelling(demo_dir, image, encoder):
    """LLaMA-Factory's newer parts keep text under "value" (read as empty text before); OpenAI nests the URL;
    others use "url" or "path". All read the same text and image; an empty text turn is a bad record."""
    spellings = [
        [{"type": "image_url", "value": str(image)}, {"type": "text", "value": "What is in this picture?"}],
        [{"type": "image_url", "image_url": {"url": f"file://{image}"}},
         {"type": "text", "text": "What is in this picture?"}],
        [{"type": "image", "url": str(image)}, {"type": "text", "text": "What is in this picture?"}],
        [{"type": "image", "path": str(image)}, {"type": "text", "value": "What is in this picture?"}],
    ]
    for parts in spellings:
        record = {"messages": [{"role": "user", "content": parts},
                               {"role": "assistant", "content": [{"type": "text", "value": ANSWER}]}]}
        sample = to_sample(record, _source(demo_dir), 0)
        assert sample.messages[0]["content"] == [{"type": "image"},
                                                 {"type": "text", "text": "What is in this picture?"}]
        assert len(sample.images) == 1 and load_images(sample)[0].size == (64, 64)
        assert _learned(encoder, sample) == ANSWER + "<|im_end|>"
    empty = {"messages": [{"role": "user", "content": [{"type": "image", "image": str(image)}]},
                          {"role": "assistant", "content": [{"type": "text", "value": ""}]}]}
    with pytest.raises(DataError, match=r"peer.jsonl record 3: bad_record: turn 1 \(assistant\) is empty"):
        to_sample(empty, _source(demo_dir), 3)
    with pytest.raises(DataError, match="a text part with no text"):
        to_sample({"messages": [{"role": "user", "content": [{"type": "text", "content": "hi"}]},
                                {"role": "assistant", "content": ANSWER}]}, _source(demo_dir), 4)


def test_an_image_placeholder_spelled_in_a_typed_text_part_is_text(demo_dir, image, encoder):
    """Typed parts give each image a part of its own, so an `<image>` (or `<video>`) written inside a text part
    (a question about the LLaVA format, say) is text: one image, its text kept verbatim and encoded as text."""
    question = "What does <image> mean in LLaVA data, and <video>?"
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                        {"type": "text", "text": question}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "A placeholder <image>."}]}]}
    sample = to_sample(record, _source(demo_dir), 0)
    assert sample.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": question}]
    assert sample.messages[1]["content"] == [{"type": "text", "text": "A placeholder <image>."}]
    assert len(sample.images) == 1
    encoded = encoder.encode(sample, load_images(sample))
    assert question in encoder.tokenizer.decode(encoded["input_ids"][0])
    assert _learned(encoder, sample) == "A placeholder <image>.<|im_end|>"
    # in a plain-string turn the layout's own placeholder is still the image's place
    plain = to_sample({"messages": [{"role": "user", "content": "<image>Describe."},
                                    {"role": "assistant", "content": ANSWER}], "images": [str(image)]},
                      _source(demo_dir), 1)
    assert plain.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe."}]


def test_a_record_level_system_field_is_the_system_message(demo_dir, image, encoder):
    record = {"conversations": [{"from": "human", "value": "<image>What is in this picture?"},
                                {"from": "gpt", "value": ANSWER}],
              "system": "You are a Pokemon expert.", "images": [str(image)]}
    sample = to_sample(record, _source(demo_dir), 0)
    assert sample.messages[0] == {"role": "system", "content": [{"type": "text", "text": "You are a Pokemon expert."}],
                                  "learn": False}
    assert encoder.render(sample.messages).startswith("<|im_start|>system\nYou are a Pokemon expert.<|im_end|>")
    assert _learned(encoder, sample) == ANSWER + "<|im_end|>"
    both = {**record, "conversations": [{"from": "system", "value": "Be brief."}, *record["conversations"]]}
    with pytest.raises(DataError, match="both a 'system' field and a system turn"):
        to_sample(both, _source(demo_dir), 1)


def test_audio_is_refused_even_when_its_file_is_missing(demo_dir, image):
    records = [
        {"messages": [{"role": "user", "content": "<audio>What is said?"}, {"role": "assistant", "content": "Hi."}],
         "audios": ["gone.wav"]},
        {"messages": [{"role": "user", "content": "What is said?"}, {"role": "assistant", "content": "Hi."}],
         "audios": ["gone.wav"]},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "..."}}]},
                      {"role": "assistant", "content": "Hi."}]},
    ]
    for i, record in enumerate(records):
        with pytest.raises(DataError, match=f"peer.jsonl record {i}: unsupported_media: .*audio"):
            to_sample(record, _source(demo_dir), i)


def test_a_template_that_cannot_render_a_record_names_it(demo_dir, image, tmp_path):
    """A chat template that takes only text content: the record with typed image parts is a bad record with the
    template's own message, not a traceback out of preflight."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_dir / "model")
    processor.chat_template = ("{% for m in messages %}{% if m['content'] is not string %}"
                               "{{ raise_exception('this template takes text content only') }}{% endif %}"
                               "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    encoder = Encoder(processor, adapter_for("qwen3_vl"), 512)
    path = tmp_path / "t.jsonl"
    records = [{"messages": [{"role": "user", "content": "Say a caption."}, {"role": "assistant", "content": ANSWER}]},
               {"messages": [{"role": "user", "content": [{"type": "image", "image": str(image)}]},
                             {"role": "assistant", "content": ANSWER}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    checks = check(RecordIndex([str(path)]), encoder)
    assert [c.kind for c in checks] == ["ok", "bad_record"]
    assert f"{path} record 1: bad_record: the chat template cannot render this conversation" in checks[1].message
    assert "this template takes text content only" in checks[1].message


def test_embedded_data_urls_decode_and_web_urls_are_refused(demo_dir, image, encoder):
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    record = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "text", "text": "What is in this picture?"}]},
                           {"role": "assistant", "content": ANSWER}]}
    sample = to_sample(record, _source(demo_dir), 0)
    assert sample.images[0].data == image.read_bytes() and sample.images[0].path is None
    assert _learned(encoder, sample) == ANSWER + "<|im_end|>"
    broken = json.loads(json.dumps(record))
    broken["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + "@" * 5000
    with pytest.raises(DataError, match="does not decode as base64") as err:
        to_sample(broken, _source(demo_dir), 1)
    assert len(str(err.value)) < 300  # the payload is not echoed
    web = {"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": ANSWER}],
           "images": ["https://example.com/" + "x" * 500 + ".png"]}
    with pytest.raises(DataError, match="is a URL: images must be local files") as err:
        to_sample(web, _source(demo_dir), 2)
    assert len(str(err.value)) < 300


def test_a_per_turn_loss_key_decides_which_answers_are_learned(demo_dir, image, encoder):
    """ms-swift's per-message "loss": an assistant turn with false stays in the prompt, unlearned."""
    turns = [{"role": "user", "content": "<image>What is in this picture?"},
             {"role": "assistant", "content": "A blue square.", "loss": False},
             {"role": "user", "content": "Look again."},
             {"role": "assistant", "content": ANSWER, "loss": True}]
    sample = to_sample({"messages": turns, "images": [str(image)]}, _source(demo_dir), 0)
    assert _learned(encoder, sample) == ANSWER + "<|im_end|>"
    default = to_sample({"messages": [{k: v for k, v in t.items() if k != "loss"} for t in turns],
                         "images": [str(image)]}, _source(demo_dir), 0)
    assert _learned(encoder, default) == "A blue square.<|im_end|>" + ANSWER + "<|im_end|>"
    with pytest.raises(DataError, match=r"turn 0 \(user\): 'loss': true on a turn that is not the assistant's"):
        to_sample({"messages": [{**turns[0], "loss": True}, turns[3]], "images": [str(image)]}, _source(demo_dir), 1)
    with pytest.raises(DataError, match="no_assistant_turn: .*every one has 'loss': false"):
        to_sample({"messages": turns[:2], "images": [str(image)]}, _source(demo_dir), 2)


def test_query_response_and_alpaca_layouts(demo_dir, image, encoder):
    """ms-swift's query/response/history and LLaMA-Factory's alpaca instruction/input/output: the same sample
    as the ShareGPT record of the same conversation."""
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."},
                                  {"from": "human", "value": "<image>What is it?"},
                                  {"from": "gpt", "value": "A circle."},
                                  {"from": "human", "value": "Which colour?\nAnswer in a sentence."},
                                  {"from": "gpt", "value": ANSWER}], "images": [str(image)]}
    swift = {"system": "Be brief.", "history": [["<image>What is it?", "A circle."]],
             "query": "Which colour?\nAnswer in a sentence.", "response": ANSWER, "images": [str(image)]}
    alpaca = {"system": "Be brief.", "history": [["<image>What is it?", "A circle."]],
              "instruction": "Which colour?", "input": "Answer in a sentence.", "output": ANSWER,
              "images": [str(image)]}
    reference = to_sample(sharegpt, _source(demo_dir), 0)
    for name, record in (("swift", swift), ("alpaca", alpaca)):
        sample = to_sample(record, _source(demo_dir), 0)
        assert sample.messages == reference.messages, name
        encoded = encoder.encode(sample, load_images(sample))
        expected = encoder.encode(reference, load_images(reference))
        assert torch.equal(encoded["input_ids"], expected["input_ids"]) and torch.equal(encoded["labels"],
                                                                                          expected["labels"])
        assert to_sample(record, _source(demo_dir), 0, data_format=name).messages == reference.messages
    with pytest.raises(DataError, match=r"turn 1 \(assistant\) is empty"):
        to_sample({"instruction": "Say hi."}, _source(demo_dir), 5)


def test_keys_nothing_reads_are_reported_with_a_count(demo_dir, image, tmp_path, encoder):
    rows = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>What?"},
                                               {"from": "gpt", "value": ANSWER, "weight": 0.5}],
             "images": [str(image)], **({"meta": "[]"} if i < 2 else {})} for i in range(3)]
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checks = check(RecordIndex([str(path)]), encoder)
    assert [c.kind for c in checks] == ["ok"] * 3 and set(checks.ignored) == {"id", "meta", "turn.weight"}
    text = summarize(checks)
    assert "ignored key `id` in 3 records" in text and "ignored key `meta` in 2 records" in text
    assert "ignored key `turn.weight` in 3 records" in text
