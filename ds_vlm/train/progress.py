"""What the training loop carries from step to step (`Progress`), what each step's outcome says about going on
(a preemption every rank agreed on, too many bad records, too many non-finite steps in a row), and which stops
every rank reaches together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ds_vlm.checkpoint.resume import find_checkpoint
from ds_vlm.data.preflight import BadDataError, BadRecordCount, TooManyBadRecords
from ds_vlm.runtime.faults import Preempted
from ds_vlm.train.step import PendingStep


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


@dataclass
class Progress:
    """What the loop carries from step to step."""

    step: int = 0                       # optimizer steps done
    bad_in_a_row: int = 0               # consecutive skipped (non-finite) steps
    skipped: int = 0                    # skipped steps in all

    def after(self, pending: PendingStep, bad_records: BadRecordCount, max_bad_steps: int,
              output_dir: str) -> Optional[Exception]:
        """Step `self.step` is done as `pending` says: None, or why to stop (every rank reaches the same answer:
        the stop vote and the bad-record count were all-reduced, the applied flag is the engine's)."""
        self.bad_in_a_row = 0 if pending.applied else self.bad_in_a_row + 1
        self.skipped += not pending.applied
        if pending.stop:
            return Preempted(f"preempted after step {self.step}")
        if pending.bad_records:
            bad_records.add(self.step, pending.bad_records)
            too_many = bad_records.over_limit()
            if too_many:
                return too_many
        if self.bad_in_a_row >= max_bad_steps:
            return TrainingDiverged(
                f"{self.bad_in_a_row} optimizer steps in a row (up to step {self.step}) had a non-finite loss "
                f"or gradient and were skipped; stopping. Last good checkpoint: "
                f"{find_checkpoint(output_dir) or 'none'}. Lower --lr or check the data.")
        return None


# Stops every rank reaches together (their decision rides a collective or data every rank holds): no rank needs
# telling. Any other exception may be this rank's alone, and the others would wait for it in a collective.
AGREED_STOPS = (Preempted, TrainingDiverged, TooManyBadRecords, BadDataError)
