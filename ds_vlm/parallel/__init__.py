"""How the ranks divide a run: data parallelism over groups of `sp_size` consecutive ranks, each group
training on the same samples with every sequence split over its ranks (Ulysses, ulysses.py). Every size the
trainer computes (the batch plan's data-parallel size, the loader's rank, the SP slices) comes from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    sp_size: int = 1  # --sequence_parallel

    def __post_init__(self):
        if self.sp_size < 1 or self.world_size % self.sp_size:
            raise ValueError(f"--sequence_parallel {self.sp_size}: the world size {self.world_size} is not a "
                             "multiple of it")

    @property
    def dp_size(self) -> int:
        """Data-parallel groups: how many ways each global batch is dealt."""
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel group (the slot its micro-batches come from)."""
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        """This rank's place in its sequence-parallel group (which slice of each sequence it holds)."""
        return self.rank % self.sp_size

    def describe(self) -> str:
        return f"world {self.world_size}" + (f" ({self.dp_size} groups of {self.sp_size} sequence-parallel ranks)"
                                             if self.sp_size > 1 else "")
