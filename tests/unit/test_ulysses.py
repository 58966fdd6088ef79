"""Sequence parallelism's label rows per slice, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from ds_vlm.parallel.ulysses import SequenceParallel
from ds_vlm.train.loss import LabelRows


def _group(size: int, rank: int) -> SequenceParallel:
    """A SequenceParallel seen from one rank, without a process group (for what needs none)."""
    return SequenceParallel(size, rank)


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


def test_linear_attention_heads_must_split_over_the_group():
    """Each rank runs the Gated DeltaNet layers on whole sequences for 1/N of their key and value heads: a tower
    whose linear-attention heads do not divide by --sequence_parallel is refused before anything is loaded."""
    from ds_vlm.testing.hybrid import tiny_hybrid_text_config

    config = tiny_hybrid_text_config()  # 2 key heads, 4 value heads
    with pytest.raises(ValueError, match="2 key and 4 value heads do not split evenly"):
        _group(4, 0).attn_implementation("varlen", config)
