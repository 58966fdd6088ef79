"""What the model will see, one JSON line per record (`ds-vlm validate --dump FILE.jsonl [--dump_records N]`):

    {"file", "record", "text": the rendered input decoded (a run of one image or video token as `TOKEN×N`),
     "learned": the learned spans as text, "control_tokens": {special token: count in the input ids},
     "images": [{"width", "height", "mode"}] (the size that enters the processor, the file's mode as decoded),
     "notes": ignored keys and what reading changed}

or {"file", "record", "error", "kind"} for a bad record. It takes the records through the trainer's own path
(RecordIndex.sample, the decoders, Encoder.encode), so what it shows is what training gets."""

from __future__ import annotations

import json

from ds_vlm.data.encode import IGNORE_INDEX, Encoder
from ds_vlm.data.formats import DataError
from ds_vlm.data.images import load_image
from ds_vlm.data.sources import RecordIndex
from ds_vlm.data.videos import load_videos


def dump_records(records: RecordIndex, encoder: Encoder, path: str, count: int = 20) -> int:
    """Write the first `count` records' lines to `path`; how many were written."""
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        for index in range(min(count, len(records))):
            out.write(json.dumps(record_line(records, encoder, index), ensure_ascii=False) + "\n")
            written += 1
    return written


def record_line(records: RecordIndex, encoder: Encoder, index: int) -> dict:
    f, local = records.locate(index)
    head = {"file": f.path, "record": f.row(local)}
    try:
        sample = records.sample(index)
        modes: list[str] = []
        images = [load_image(ref, sample, modes) for ref in sample.images]
        if sample.videos and encoder.video_token is None:
            encoder.media(sample)  # raises the family's unsupported_media
        encoded = encoder.encode(sample, images, load_videos(sample, encoder.video_sampling))
    except DataError as err:
        return {**head, "error": str(err), "kind": err.kind}
    except Exception as err:  # what the trainer's path names as a bad record, named here too
        return {**head, "error": f"{type(err).__name__} while encoding it: {' '.join(str(err).split())[:300]}",
                "kind": "bad_record"}
    ids, labels = encoded["input_ids"][0].tolist(), encoded["labels"][0].tolist()
    return {**head, "text": _text(encoder, ids), "learned": _learned(encoder, ids, labels),
            "control_tokens": _control_tokens(encoder.tokenizer, ids),
            "images": [{"width": image.width, "height": image.height, "mode": mode} for image, mode in
                       zip(images, modes)],
            "notes": [f"ignored key `{key}`" for key in sample.ignored] + sorted(set(sample.notes))}


def _runs(values: list) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i))
            start = i
    return runs


def _text(encoder: Encoder, ids: list[int]) -> str:
    """The input decoded, each run of an image or video token written once with its length."""
    media = {encoder.image_token_id}
    if encoder.video_token_id is not None:
        media.add(encoder.video_token_id)
    pieces, plain = [], []
    for start, end in _runs(ids):
        if ids[start] in media and end - start > 1:
            pieces += [encoder.tokenizer.decode(plain), f"{encoder.tokenizer.convert_ids_to_tokens(ids[start])}"
                                                        f"×{end - start}"]
            plain = []
        else:
            plain += ids[start:end]
    return "".join(pieces) + encoder.tokenizer.decode(plain)


def _learned(encoder: Encoder, ids: list[int], labels: list[int]) -> list[str]:
    learned = [label != IGNORE_INDEX for label in labels]
    return [encoder.tokenizer.decode(ids[start:end]) for start, end in _runs(learned) if learned[start]]


def _control_tokens(tokenizer, ids: list[int]) -> dict[str, int]:
    special = set(getattr(tokenizer, "all_special_ids", []))
    special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    counts: dict[str, int] = {}
    for i in ids:
        if i in special:
            token = tokenizer.convert_ids_to_tokens(i)
            counts[token] = counts.get(token, 0) + 1
    return counts
