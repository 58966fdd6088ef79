"""Sequence parallelism's label rows per slice, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from ds_vlm.loss import LabelRows
from ds_vlm.parallel.ulysses import SequenceParallel


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


def test_linear_attention_layers_are_refused():
    """Qwen3.5's Gated DeltaNet layers need whole sequences per head (an all-to-all of their own, not written
    yet): --sequence_parallel refuses a tower that has them, before anything is loaded."""
    from transformers import Qwen3_5TextConfig

    config = Qwen3_5TextConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    with pytest.raises(ValueError, match="linear-attention layers"):
        _group(2, 0).attn_implementation("varlen", config)
