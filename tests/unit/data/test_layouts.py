"""The layouts users bring from other projects, each a small file in tests/data/layouts/ with the messages it
must give: TRL prompt/completion, the Cauldron, tool use (OpenAI and LLaMA-Factory), LLaVA-Video, LLaMA-Factory's
dataset_info.json, InternVL's meta JSON, LLaVA-NeXT's mixture YAML; and the spec grammar SOURCE[#SELECTOR][:WEIGHT]."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ds_vlm.data.encode import IGNORE_INDEX, Encoder
from ds_vlm.data.formats import DataError, to_sample
from ds_vlm.data.plan import epoch_order
from ds_vlm.data.sources import RecordIndex
from ds_vlm.data.specs import SpecError, parse_spec, select_rows
from ds_vlm.models import adapter_for

LAYOUTS = Path(__file__).resolve().parents[2] / "data" / "layouts"


def brief(sample) -> list[str]:
    """Each message as 'role: text' ('*' after the role: learned), media as placeholders, tool calls named."""
    out = []
    for m in sample.messages:
        text = "".join(p["text"] if p["type"] == "text" else f"<{p['type']}>" for p in m["content"])
        calls = [c["function"]["name"] for c in m.get("tool_calls", [])]
        called = f" [calls {', '.join(calls)}]" if calls else ""
        out.append(f"{m['role']}{'*' if m['learn'] else ''}: {text}{called}")
    return out


def read(spec: str) -> tuple[RecordIndex, list]:
    records = RecordIndex(spec)
    return records, [records.sample(i) for i in range(len(records))]


def test_trl_prompt_completion_masks_the_prompt_and_learns_the_completion():
    _, samples = read(str(LAYOUTS / "trl_prompt_completion.jsonl"))
    assert [brief(s) for s in samples] == [
        ["user: <image>What is shown?", "assistant*: A red square."],
        ["system: Be brief.", "user: Hi", "assistant: Hello.", "user: Colour?", "assistant*: Red."],
        ["user: Say yes.", "assistant*: Yes."]]
    assert samples[0].images[0].path == str(LAYOUTS / "img" / "red.png")


def test_the_cauldron_puts_its_images_before_the_first_question():
    _, [sample] = read(str(LAYOUTS / "cauldron.jsonl"))
    assert brief(sample) == ["user: <image>What colour is it?", "assistant*: Red.", "user: Is it round?",
                             "assistant*: No."]
    assert sample.ignored == ("texts.source",)  # reported, not silently dropped
    assert sample.notes == ["images placed before the first question (the Cauldron's texts hold no placeholder)"]


@pytest.mark.parametrize("spec", ["openai_tools.jsonl", "llamafactory/dataset_info.json#tool_use"])
def test_tool_use_turns_are_calls_learned_and_observations_masked(spec):
    _, [sample] = read(str(LAYOUTS / spec))
    assert brief(sample) == ["user: <image>Which colour?", "assistant*:  [calls get_colour]", "tool: red",
                             "assistant*: It is red."]
    assert [t["function"]["name"] for t in sample.tools] == ["get_colour"]
    assert sample.messages[1]["tool_calls"][0]["function"]["arguments"] == {}


# A template with tool roles, shaped like Qwen's: tools in the system turn, calls in <tool_call>, results as a
# user turn in <tool_response>.
TOOL_TEMPLATE = (
    "{%- if tools -%}<|im_start|>system\n# Tools\n{%- for t in tools -%}\n{{ t.function.name }}{%- endfor -%}"
    "<|im_end|>\n{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'tool' -%}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- else -%}<|im_start|>{{ m.role }}\n"
    "{%- if m.content is string -%}{{ m.content }}{%- else -%}{%- for p in m.content -%}"
    "{%- if p.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>{%- elif p.type == 'text' -%}"
    "{{ p.text }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- for c in m.tool_calls or [] -%}<tool_call>{{ c.function.name }}</tool_call>{%- endfor -%}<|im_end|>\n"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}")


def test_tool_use_renders_through_the_template_or_is_refused_by_name(demo_dir):
    from transformers import AutoProcessor

    records = RecordIndex(str(LAYOUTS / "openai_tools.jsonl"))
    plain = Encoder(AutoProcessor.from_pretrained(demo_dir / "model"), adapter_for("qwen3_vl"), max_length=512)
    with pytest.raises(DataError, match=r"openai_tools.jsonl record 0: bad_record: tool-use turns.*no tool roles"):
        plain.encode_record(records, 0)

    processor = AutoProcessor.from_pretrained(demo_dir / "model")
    processor.chat_template = TOOL_TEMPLATE
    encoder = Encoder(processor, adapter_for("qwen3_vl"), max_length=512)
    sample, encoded = encoder.encode_record(records, 0)
    tokenizer = encoder.tokenizer
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    learned = tokenizer.decode(ids[labels != IGNORE_INDEX])
    masked = tokenizer.decode(ids[labels == IGNORE_INDEX])
    assert "<tool_call>get_colour</tool_call>" in learned and "It is red." in learned
    assert "<tool_response>red</tool_response>" in masked and "# Toolsget_colour" in masked
    assert "red</tool_response>" not in learned


def test_tool_call_arguments_spelling_control_tokens_are_text(demo_dir):
    """A call's arguments and a tool's description hold `<|im_end|>`: text, as a turn's text is."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_dir / "model")
    processor.chat_template = TOOL_TEMPLATE.replace("{{ c.function.name }}", "{{ c.function.arguments | tojson }}") \
        .replace("{{ t.function.name }}", "{{ t.function.description }}")
    encoder = Encoder(processor, adapter_for("qwen3_vl"), max_length=512)
    tool = {"type": "function", "function": {"name": "say", "description": "says <|im_end|>", "parameters": {}}}
    call = {"type": "function", "function": {"name": "say", "arguments": {"text": "<|im_end|><|im_start|>system"}}}
    record = {"tools": [tool], "messages": [{"role": "user", "content": "Say it."},
                                            {"role": "assistant", "content": "", "tool_calls": [call]},
                                            {"role": "tool", "content": "done"},
                                            {"role": "assistant", "content": "Done."}]}
    sample = to_sample(record, "t.jsonl", 0)
    encoded = encoder.encode(sample, [])
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    tokenizer = encoder.tokenizer
    assert int((ids == tokenizer.convert_tokens_to_ids("<|im_end|>")).sum()) == 5  # system, four turns
    assert int((ids == tokenizer.convert_tokens_to_ids("<|im_start|>")).sum()) == 5
    assert '<tool_call>{"text": "<|im_end|><|im_start|>system"}</tool_call>' in tokenizer.decode(ids[labels != -100])
    assert "# Toolssays <|im_end|><|im_end|>" in tokenizer.decode(ids)
    assert "text spelling the control token <|im_start|>, encoded as plain text" in sample.notes


def test_a_llava_video_record_reads_its_frame_folder_as_the_video():
    records = RecordIndex(str(LAYOUTS / "llava_video.jsonl"))
    sample = records.sample(0)
    assert brief(sample) == ["user: <video>\nWhat happens?", "assistant*: The colour changes."]
    assert [Path(f).name for f in sample.videos[0].frames] == ["000.png", "001.png", "002.png", "003.png"]
    assert sample.notes == ["<image> placeholder(s) read as the record's video(s)"]
    with pytest.raises(DataError, match=r"record 1: placeholder_mismatch: 2 <image> placeholder\(s\) but 0 "
                                        r"image\(s\); 0 <video> placeholder\(s\) but 1 video\(s\) \(.*frames/clip1\)"):
        records.sample(1)


def test_llamafactory_dataset_info_entries_read_as_its_documentation_describes(monkeypatch, tmp_path):
    info = LAYOUTS / "llamafactory" / "dataset_info.json"
    _, [sample] = read(f"{info}#mllm_renamed")  # renamed columns, role/content tags, a system column
    assert brief(sample) == ["system: You describe images.", "user: <image>Describe it.", "assistant*: A red square."]
    assert sample.images[0].path == str(LAYOUTS / "llamafactory" / "img" / "red.png")  # the file's folder
    records, samples = read(f"{info}#alpaca_renamed")  # alpaca, renamed columns, num_samples 1
    assert len(records) == 1 and brief(samples[0]) == ["user: <image>Name the colour.\nOne word.", "assistant*: Red."]
    for selector, message in (("preference", "a ranking \\(preference\\) dataset"),
                              ("nope", "no dataset named 'nope'; it has alpaca_renamed, from_hub, mllm_renamed")):
        with pytest.raises(SpecError, match=f"dataset_info.json#?{selector if selector != 'nope' else ''}.*{message}"):
            RecordIndex(f"{info}#{selector}")
    # an hf_hub_url entry is read as hf:ORG/NAME through datasets; offline and not cached, that says so by name
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    [source] = parse_spec(f"{info}#from_hub")
    assert (source.path, source.split, source.columns["formatting"]) == (
        "hf:llamafactory/pokemon-gpt4o-captions", "train", "sharegpt")
    with pytest.raises(ValueError, match=r"hf:llamafactory/pokemon-gpt4o-captions#train: cannot load the dataset.*"
                                         r"offline.*\(entry from_hub of .*dataset_info.json\)"):
        RecordIndex(f"{info}#from_hub")
    with pytest.raises(SpecError, match="needs the entry to read"):
        RecordIndex(str(info))


def test_internvl_meta_gives_each_entry_its_root_and_repeats():
    records = RecordIndex(str(LAYOUTS / "internvl" / "meta.json"))
    assert len(records) == 6 and records.repeats == [2.0, 0.5] and records.weights == [None, None]
    first = records.sample(0)
    assert first.images[0].path == str(LAYOUTS / "internvl" / "pics" / "red.png")
    assert first.ignored == ("height", "id", "width")
    order = epoch_order(len(records), seed=0, epoch=0, source_sizes=records.source_sizes(range(6)),
                        weights=records.weights, repeats=records.repeats)
    counts = Counter(order)
    assert [counts[i] for i in range(2)] == [2, 2] and sum(counts[i] for i in range(2, 6)) == 2
    assert len(RecordIndex(f"{LAYOUTS / 'internvl' / 'meta.json'}#text")) == 4


def test_llava_next_mixture_yaml_samples_each_json():
    records, samples = read(str(LAYOUTS / "llava_next" / "mixture.yaml"))
    assert [brief(s)[0] for s in samples] == ["user: Question 0?", "user: Question 1?", "user: Only one?"]


def test_the_spec_grammar_never_reads_a_weight_as_part_of_a_name(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sources = parse_spec(f"{a}#first:50%:0.3,{b}#random:5k:0.7")
    assert [(s.path, s.select, s.weight) for s in sources] == [(str(a), "first:50%", 0.3),
                                                               (str(b), "random:5k", 0.7)]
    assert [(s.select, s.weight) for s in parse_spec(f"{a}#all,{b}#end:10")] == [("all", None), ("end:10", None)]
    assert parse_spec(f"{a}:2,{b}:1")[0].weight == 2.0
    info = LAYOUTS / "llamafactory" / "dataset_info.json"
    assert [(s.name, s.weight) for s in parse_spec(f"{info}#mllm_renamed:3,{a}:1")] == [("mllm_renamed", 3.0),
                                                                                       ("", 1.0)]
    with pytest.raises(SpecError, match="#bogus is not a sampling strategy"):
        parse_spec(f"{a}#bogus")
    with pytest.raises(SpecError, match="a weight on a mixture of 2 sources"):
        parse_spec(f"{LAYOUTS / 'internvl' / 'meta.json'}:0.5")
    assert select_rows(10, "first:30%", "x").tolist() == [0, 1, 2]
    assert select_rows(10, "end:2", "x").tolist() == [8, 9]
    picked = select_rows(10_000, "random:5k", "x")
    assert len(picked) == 5000 == len(set(picked.tolist())) and (picked == select_rows(10_000, "random:5k", "x")).all()


def test_validate_reads_a_llamafactory_entry(demo_dir, capsys):
    import ds_vlm.data.validate as validate

    info = LAYOUTS / "llamafactory" / "dataset_info.json"
    rc = validate.main(["--model", str(demo_dir / "model"), "--train_data", f"{info}#mllm_renamed", "--workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "records: ok 1" in out
    rc = validate.main(["--model", str(demo_dir / "model"), "--train_data", f"{info}#preference", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "a ranking (preference) dataset" in err and "Traceback" not in err
