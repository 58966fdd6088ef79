"""--sequence_parallel N (Ulysses): a group of N ranks trains on one set of samples, each rank 1/N of every
sequence. The same losses and gradient norms as without it on the same global batch, for ZeRO-2 and ZeRO-3,
mixed image/text batches, packing, and 2 groups of 2."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, read_metrics, run_train

from ds_vlm.data.batching import Collator, count_targets
from ds_vlm.loss import LabelRows
from ds_vlm.parallel import SequenceParallel


def _group(size: int, rank: int) -> SequenceParallel:
    """A SequenceParallel seen from one rank, without a process group (for what needs none)."""
    sp = object.__new__(SequenceParallel)
    sp.size, sp.rank = size, rank
    return sp


def test_each_rank_keeps_the_label_rows_of_its_slice_shifted_first():
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100, 8, 9], [-100, 1, 2, -100, -100, -100, 3, -100]])
    full = LabelRows.from_labels(labels)
    parts = [_group(2, r).local_rows(full, labels.shape[1]) for r in range(2)]
    assert sum(len(p) for p in parts) == len(full) == 8  # every label counted once
    for rank, part in enumerate(parts):
        following = torch.full_like(labels, -100)
        following[:, :-1] = labels[:, 1:]  # shifted on the whole sequence, then cut
        local = following[:, rank * 4:(rank + 1) * 4].flatten()
        assert torch.equal(part.rows, (local != -100).nonzero().squeeze(1)) and torch.equal(part.targets,
                                                                                           local[part.rows])
    # label 7 sits at position 4, rank 1's first; the token predicting it (position 3) is rank 0's: rank 0 has it
    assert 7 in parts[0].targets.tolist() and 7 not in parts[1].targets.tolist()


def test_sequences_are_padded_to_split_evenly_or_refused(demo_dir, mixed_data):
    from transformers import AutoConfig, AutoProcessor

    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for

    processor = AutoProcessor.from_pretrained(demo_dir / "model")
    encoder = Encoder(processor, adapter_for("qwen3_vl"), 512)
    records = RecordIndex([str(mixed_data)])
    samples = [encoder.encode(records.sample(i), []) for i in (1, 3)]  # text-only
    lengths = [int(s["input_ids"].shape[1]) for s in samples]
    rope = adapter_for("qwen3_vl").position_ids(AutoConfig.from_pretrained(demo_dir / "model"))
    for positions in (None, rope):  # padded rows, then one packed row
        batch, meta = Collator(encoder.tokenizer.pad_token_id, encoder.dummy(), positions, multiple_of=3,
                               packing=positions is not None)(samples)
        assert batch["input_ids"].shape[1] % 3 == 0 and meta["tokens"] == sum(lengths)
        assert count_targets(batch["labels"]) == meta["targets"]  # the padding has no label
        if positions is not None:
            assert batch["position_ids"].shape[-1] == batch["input_ids"].shape[1] == int(batch["cu_seq_lens"][-1])
    with pytest.raises(ValueError, match="does not split over --sequence_parallel 2"):
        _group(2, 0).bounds(7)


def _varied(demo_dir, mixed_data, tmp_path):
    """The mixed image/text records, answers of 1 to 3 sentences."""
    rows = [json.loads(line) for line in mixed_data.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["images"] = [str(demo_dir / "data" / p) for p in row["images"]]
        row["conversations"][1]["value"] = " ".join([row["conversations"][1]["value"]] * (1 + i % 3))
    path = tmp_path / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(demo_dir, data, out, ranks: int, *extra: str, stage: int = 2):
    proc = run_train(["--model", str(demo_dir / "model"), "--train_data", str(data), "--deepspeed",
                      str(ROOT / "ds_configs" / f"zero{stage}.json"), "--output_dir", str(out), "--max_steps", "3",
                      "--micro_batch_size", "2", "--lr", "1e-3", "--warmup_ratio", "0", "--train_vision", "all",
                      "--num_workers", "0", "--export_hf", "false", "--dist_timeout_s", "120", *extra],
                     nprocs=ranks)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return read_metrics(out), proc


def _same(rows, reference):
    assert [r["step"] for r in rows] == [1, 2, 3]
    for got, want in zip(rows, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), (rows, reference)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (rows, reference)
        assert got["tokens"] == want["tokens"] and got["targets"] == want["targets"]


@pytest.mark.dist
def test_two_ranks_as_one_group_equal_one_rank(demo_dir, mixed_data, tmp_path):
    """1 rank without SP against 2 ranks with --sequence_parallel 2, the same global batch of 2 (one sample
    of each micro-batch is text-only about half the time; answers of different lengths so sequences are
    padded to split evenly): ZeRO-2 with --packing, ZeRO-3 without. A gradient off by the group size (what
    DeepSpeed's ZeRO-3 reduce-scatter gave with an SP mpu) changes the norm and the later losses."""
    data = _varied(demo_dir, mixed_data, tmp_path)
    reference, _ = _run(demo_dir, data, tmp_path / "one_rank", 1)
    for name, stage, extra in (("zero2_packed", 2, ("--packing",)), ("zero3", 3, ())):
        rows, proc = _run(demo_dir, data, tmp_path / name, 2, "--sequence_parallel", "2", *extra, stage=stage)
        assert "(1 groups of 2 sequence-parallel ranks)" in proc.stderr
        _same(rows, reference)


@pytest.mark.dist
def test_four_ranks_as_two_groups_equal_two_ranks(demo_dir, mixed_data, tmp_path):
    data = _varied(demo_dir, mixed_data, tmp_path)
    reference, _ = _run(demo_dir, data, tmp_path / "two_ranks", 2, stage=3)
    rows, proc = _run(demo_dir, data, tmp_path / "two_groups", 4, "--sequence_parallel", "2", stage=3)
    assert "(2 groups of 2 sequence-parallel ranks)" in proc.stderr
    _same(rows, reference)
