"""The step log: each logged step's line written one step late, its numbers summed by the next step's
all-reduce (no collective of its own) or, at a pause, by one of its own; the lines as metrics.jsonl had them."""

from __future__ import annotations

import json

import torch


def _pending(step: int, carried=None):
    from ds_vlm.train.step import PendingStep

    # the 7 summed values (loss sum, aux sum, targets, tokens, samples, computed, FLOPs), then 3 x 1 rank of memory
    totals = torch.tensor([2.0 * step, 0, 4, 10, 2, 12, 1e9, 0.5, 0, 0], dtype=torch.float64)
    return PendingStep(True, False, 0, totals=totals, grad_norm=1.0, world_size=1, carried=carried)


def test_a_logged_step_is_written_once_the_next_has_started(monkeypatch, tmp_path):
    import torch.distributed as dist

    from ds_vlm.runtime.run_log import RunLog
    from ds_vlm.train.step import InFlight
    from ds_vlm.train.step_log import StepLog

    reported, reduces = [], []

    class Reporter:
        def log(self, step, values):
            reported.append((step, values))

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    original_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: reduces.append(t.numel())
                        or original_all_reduce(t, *a, **k))
    try:
        log = RunLog(str(tmp_path), enabled=True)
        log.start_progress(5, 0)
        step_log = StepLog(log, Reporter(), every=2, total_steps=5, world_size=1, peak_tflops=None)
        assert [s for s in range(1, 6) if step_log.wants(s)] == [2, 4, 5]  # every 2nd, and the last
        written = []
        for step in range(1, 6):
            carry = step_log.carry()  # the held step's totals, for this step's all-reduce
            assert (carry is not None) == (step == 3)  # step 4 was flushed before step 5 (a pause)
            carried = None if carry is None else InFlight(carry.clone(), _Done())  # what the runner's sum gives
            step_log.next(step, _pending(step, carried), lr=1e-3 * step, skipped_steps=0)
            if step in (4, 5):  # a save after step 4, the end after step 5
                step_log.flush(skipped_steps=1)
            written.append(len(reported))
        log.close()
    finally:
        dist.destroy_process_group()
    assert written == [0, 0, 1, 2, 3]  # step 2's line once step 3 started, 4's and 5's at the pauses
    assert reduces == [10, 10]  # only the flushed steps summed on their own
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5] and [s for s, _ in reported] == [2, 4, 5]
    assert list(rows[0]) == ["time", "step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s",
                             "step_time_s", "tokens", "targets", "padding_efficiency", "tflops_per_gpu", "mfu",
                             "peak_mem_gb", "peak_reserved_gb", "peak_tensor_gb", "skipped", "skipped_steps"]
    assert rows[0]["loss"] == 1.0 and rows[0]["lr"] == 2e-3 and rows[0]["tokens"] == 10
    assert rows[0]["padding_efficiency"] == 10 / 12 and rows[0]["peak_mem_gb"] == [0.5]
    assert rows[0]["peak_reserved_gb"] is None and rows[0]["mfu"] is None
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert reported[0][1] == {k: v for k, v in rows[0].items() if k != "time"}


class _Done:
    def wait(self) -> None:
        pass
