#!/usr/bin/env python
"""Turn the Pokemon captions data into the files the trainer reads, with a seeded train/test split.

    python launch/prepare_pokemon.py --out data/pokemon                 # llamafactory/pokemon-gpt4o-captions (online)
    python launch/prepare_pokemon.py --source PATH --out data/pokemon   # a local copy, offline

PATH is a `datasets` `save_to_disk` folder (a Dataset or a DatasetDict), a parquet file, or a folder
of parquet files, with the hub dataset's columns: `conversations` ([{from, value}]) or `messages`
([{role, content}]), and `images` (a list of images: PIL images, {bytes, path} dicts, paths or bytes).

Writes OUT/train.jsonl and OUT/test.jsonl in the ShareGPT layout,
    {"conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", "value": "..."}],
     "images": ["images/000012_0.png"]}
with the image files under OUT/images/ (their original bytes; paths relative to the JSONL files).
A human turn gets `<image>` placeholders if the record has images and none. Records whose images do
not decode, or whose placeholders do not match their images, are left out and counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

from ds_vlm.data.formats import IMAGE_PLACEHOLDER, DataError, ImageRef, to_sample

HUB_ID = "llamafactory/pokemon-gpt4o-captions"
BATCH = 256


class SkipRecord(Exception):
    pass


# -- reading -----------------------------------------------------------------------------------

def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def open_source(source: str, split: str):
    """(number of rows, iterator over rows as plain dicts with raw, undecoded images)."""
    path = Path(source)
    if path.exists():
        if path.is_dir() and any((path / n).exists() for n in ("state.json", "dataset_dict.json", "dataset_info.json")):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise SystemExit(f"{source}: no split {split!r} (has {sorted(loaded)}); pass --split")
                loaded = loaded[split]
            return len(loaded), _dataset_rows(loaded)
        files = _parquet_files(path)
        if not files:
            raise SystemExit(f"{source}: neither a save_to_disk folder nor parquet file(s)")
        import pyarrow.parquet as pq

        n_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        return n_rows, _parquet_rows(files)
    import datasets

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline, unknown id, ...: one clear line
        raise SystemExit(f"could not load {source!r} from the hub ({type(err).__name__}: {err}); without "
                         f"network, pass --source PATH to a local copy (save_to_disk folder or parquet files)")
    return len(loaded), _dataset_rows(loaded)


def _dataset_rows(dataset):
    arrow = dataset.with_format("arrow")  # images stay {bytes, path}: no decode and re-encode
    for start in range(0, len(dataset), BATCH):
        yield from arrow[start:start + BATCH].to_pylist()


def _parquet_rows(files):
    import pyarrow.parquet as pq

    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH):
            yield from batch.to_pylist()


# -- converting --------------------------------------------------------------------------------

SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def image_bytes(ref: ImageRef) -> bytes:
    """Raw encoded bytes of one image, embedded or read from its file."""
    if ref.data is not None:
        return ref.data
    if not os.path.isfile(ref.path):
        raise SkipRecord(f"image {ref.path} not found")
    with open(ref.path, "rb") as f:
        return f.read()


def image_suffix(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
            im.verify()
    except Exception as err:
        raise SkipRecord(f"image does not decode ({type(err).__name__})")
    return {"jpeg": ".jpg", "": ".png"}.get(fmt, "." + fmt)


def convert(row: dict, row_no: int, out: Path, source_dir: Path) -> dict:
    """One source row -> a ShareGPT record with its images written under out/images/. The row is read by the
    trainer's own readers (any layout it reads; images apart from the text get their placeholders)."""
    try:
        sample = to_sample(row, str(source_dir), row_no, image_root=str(source_dir), insert_placeholders=True)
    except DataError as err:
        raise SkipRecord(f"{err.kind}: {err.detail}") from err
    names = []
    for k, ref in enumerate(sample.images):
        data = image_bytes(ref)
        name = f"images/{row_no:06d}_{k}{image_suffix(data)}"
        _write_atomic(out / name, data)
        names.append(name)
    turns = [{"from": SHAREGPT_ROLES[m["role"]],
              "value": "".join(p["text"] if p["type"] == "text" else IMAGE_PLACEHOLDER for p in m["content"])}
             for m in sample.messages]
    return {"conversations": turns, "images": names}


def _write_atomic(path: Path, data: bytes) -> None:
    """Several nodes may prepare the same shared folder at once: never leave a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- main --------------------------------------------------------------------------------------

def split_rows(n_rows: int, test_size: float, seed: int) -> set[int]:
    """Row numbers of the test split: a seeded shuffle, the first `test_size` (count, or fraction if < 1)."""
    n_test = max(1, int(round(test_size * n_rows))) if 0 < test_size < 1 else int(test_size)
    n_test = max(0, min(n_test, n_rows - 1))
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return set(order[:n_test])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=HUB_ID, help=f"hub id (default {HUB_ID}) or a local save_to_disk "
                                                         f"folder / parquet file / folder of parquet files")
    parser.add_argument("--split", default="train", help="the source split to read (default train)")
    parser.add_argument("--out", default="data/pokemon", help="output folder (default data/pokemon)")
    parser.add_argument("--test_size", type=float, default=0.05,
                        help="held-out records: a fraction (< 1) or a count (>= 1); default 0.05")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split (default 42)")
    parser.add_argument("--max_samples", type=int, default=0, help="use only the first N records (0: all)")
    args = parser.parse_args(argv)
    if args.test_size < 0:
        parser.error("--test_size must be >= 0")

    n_rows, rows = open_source(args.source, args.split)
    if args.max_samples:
        n_rows = min(n_rows, args.max_samples)
    if n_rows < 2:
        raise SystemExit(f"{args.source}: {n_rows} record(s); need at least 2 for a train/test split")
    test_rows = split_rows(n_rows, args.test_size, args.seed)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    source_dir = Path(args.source) if Path(args.source).is_dir() else Path(args.source).parent

    kept = {"train": [], "test": []}
    skipped: Counter = Counter()
    n_images = 0
    for row_no, row in enumerate(rows):
        if row_no >= n_rows:
            break
        try:
            record = convert(row, row_no, out, source_dir)
        except SkipRecord as why:
            skipped[str(why)] += 1
            print(f"skipped record {row_no}: {why}", file=sys.stderr)
            continue
        n_images += len(record["images"])
        kept["test" if row_no in test_rows else "train"].append(record)

    for name in ("test", "train"):  # train.jsonl last: its presence means the folder is complete
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept[name])
        _write_atomic(out / f"{name}.jsonl", text.encode("utf-8"))
    print(f"{args.source}: {n_rows} records -> {out / 'train.jsonl'} ({len(kept['train'])}), "
          f"{out / 'test.jsonl'} ({len(kept['test'])}), {n_images} images in {out / 'images'}"
          + (f"; skipped {sum(skipped.values())}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
