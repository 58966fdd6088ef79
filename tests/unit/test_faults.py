"""What a rank says when it raises (faults.Watchdog.failed); the runs that test the rest: tests/dist/test_faults.py."""

from __future__ import annotations

from ds_vlm.runtime.faults import Watchdog, describe


def test_a_failure_in_the_step_names_its_records(capsys):
    """A forward that raises: the phase, the step and the records of the step on the rank; after the loop: the
    last step; a DataLoader worker's error: the worker's own last line."""
    dog = Watchdog(rank=0, world=1, timeout_s=1000, start=False)
    dog.phase("forward", 3)
    dog.failed(ValueError("Image features and image tokens do not match, tokens: 6, features: 4"),
               ("a.jsonl record 4", "b.jsonl record 9"))
    dog.phase("data", 4)
    dog.failed(RuntimeError("data error"), ("a.jsonl record 4",))  # a data error names its record itself
    dog.phase(None)
    dog.failed(RuntimeError("the final checkpoint could not be written"), ("a.jsonl record 4",))
    assert capsys.readouterr().err.splitlines() == [
        "ds-vlm: rank 0 failed in phase forward of step 3: ValueError: Image features and image tokens do not match, "
        "tokens: 6, features: 4 (records of the step on rank 0: a.jsonl record 4, b.jsonl record 9)",
        "ds-vlm: rank 0 failed in phase data of step 4: RuntimeError: data error",
        "ds-vlm: rank 0 failed after step 4: RuntimeError: the final checkpoint could not be written"]
    worker = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          "last):\n  File ...\nds_vlm.data.formats.DataError: a.jsonl record 5: missing_image: x\n")
    assert describe(worker) == ("ds_vlm.data.formats.DataError: a.jsonl record 5: missing_image: x (in a DataLoader "
                                "worker)")
