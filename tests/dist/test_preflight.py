"""--preflight off on 2 ranks: a bad record left out, named and counted."""

from __future__ import annotations

import json
import os

from fixtures.runs import ROOT, read_metrics, run_train


def test_two_ranks_with_preflight_off_skip_and_count_a_bad_record(demo_dir, data, tmp_path):
    """A 2-rank run that trusts its data (--preflight off) meets a record whose image is missing: the record is
    left out and named, the ranks agree on the count, the run goes on to the end."""
    lines = (data / "a.jsonl").read_text().splitlines()[:16]
    record = json.loads(lines[7])
    record["images"] = ["images/nope.png"]
    lines[7] = json.dumps(record)
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    proc = run_train(["--model", str(demo_dir / "model"), "--train_data", str(data / "a.jsonl"), "--deepspeed",
                      str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out), "--epochs", "1",
                      "--micro_batch_size", "2", "--num_workers", "1", "--preflight", "off", "--max_bad", "1",
                      "--export_hf", "false", "--dist_timeout_s", "120"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    assert "none checked (--preflight off" in proc.stderr
    assert f"left out a bad record: {data / 'a.jsonl'} record 7: missing_image" in proc.stderr
    steps = read_metrics(out)
    assert len(steps) == 4 and sum(round(r["samples_per_s"] * r["step_time_s"]) for r in steps) == 15
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["total"] for e in events if e.get("event") == "bad_records"] == [1]
    assert os.path.exists(out / "checkpoints")
