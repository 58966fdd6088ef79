"""The GPU check's orchestration (benchmarks/gpu_check.py), on stand-in stages: the priority order within a budget,
the JSON after every stage, a stage's whole process group killed at its timeout, a second call resuming."""

from __future__ import annotations

import json
import sys
import time

from benchmarks import gpu_check


def test_the_first_part_fits_one_call_and_the_order_is_the_priority():
    names = [s.name for s in gpu_check.STAGES]
    assert names[:5] == ["imports", "train_zero2", "save_resume", "export", "eval"]
    assert sum(s.planned_s for s in gpu_check.STAGES[:5]) <= gpu_check.FIRST_CALL_S == 420
    assert names.index("qlora") < names.index("liger") < names.index("sweep_2b") < names.index("plan")


def test_stages_run_within_the_budget_and_the_json_is_written_after_each(tmp_path, monkeypatch):
    """A stage starts only if its planned_s fits what is left (and the stage it reads from is ok); the rest are
    not_run with the reason; the JSON on disk holds every record so far when each stage starts; a second call
    with --resume keeps the first call's records and runs the rest."""
    out = tmp_path / "check.json"
    seen_on_disk, ran = [], []
    clock = {"now": 1000.0}
    monkeypatch.setattr(gpu_check.time, "time", lambda: clock["now"])

    def fake_run(stage, work, dry_run, timeout_s, cmd=None):
        seen_on_disk.append([r["name"] for r in json.loads(out.read_text())["stages"]] if out.exists() else [])
        ran.append((stage.name, timeout_s))
        clock["now"] += stage.planned_s  # each stage takes what it planned
        return {"name": stage.name, "planned_s": stage.planned_s, "status": "ok", "seconds": stage.planned_s,
                "detail": {}}

    monkeypatch.setattr(gpu_check, "run_stage", fake_run)
    monkeypatch.setattr(gpu_check, "skip_reason", lambda stage, dry_run: "")  # as on a GPU with every package
    names = [s.name for s in gpu_check.STAGES]
    records = gpu_check.run_check(names, tmp_path, False, 420, 1000.0, str(out), {}, {"budget_s": 420})
    status = {r["name"]: r["status"] for r in records}
    assert [n for n, _ in ran] == ["imports", "train_zero2", "save_resume", "export", "eval"]
    assert seen_on_disk == [[], ["imports"], ["imports", "train_zero2"], ["imports", "train_zero2", "save_resume"],
                            ["imports", "train_zero2", "save_resume", "export"]]
    assert [n for n, s in status.items() if s == "not_run"] == names[5:]
    assert "plans 75 s" in records[5]["detail"]["reason"]
    assert all(t <= gpu_check.BY_NAME[n].planned_s * gpu_check.OVERRUN for n, t in ran)
    report = json.loads(out.read_text())
    assert report["complete"] and [r["name"] for r in report["stages"]] == names
    # the second call: the first call's records kept, the rest run in its own budget, a stage that reads another's
    # run waits for it (plan after sweep_2b)
    ran.clear()
    clock["now"] = 5000.0
    earlier = gpu_check.earlier_records(str(out))
    records = gpu_check.run_check(names, tmp_path, False, 300, 5000.0, str(out), earlier, {})
    status = {r["name"]: r["status"] for r in records}
    # 75 + 50 + 90 + 30; sweep_2b's 180 does not fit the 55 left, nor does deepspeed_features' 120
    assert [n for n, _ in ran] == ["qlora", "lora", "qwen3_5", "liger"]
    assert status["deepspeed_features"] == "not_run"
    assert status["sweep_2b"] == status["plan"] == "not_run"
    assert "reads sweep_2b's run" in status_reason(records, "plan") or "plans 45" in status_reason(records, "plan")


def test_a_stage_over_its_time_is_killed_with_its_whole_process_group(tmp_path):
    """The DeepSpeed launcher and its ranks are a stage's children: at the timeout the whole group goes, so nothing
    holds the GPU through the next stages; a stage that ends leaves nothing behind either."""
    pids = tmp_path / "pids"
    script = (f"import os, subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
              f"time.sleep(120)\n")
    stage = gpu_check.Stage("stand_in", 1)
    started = time.monotonic()
    record = gpu_check.run_stage(stage, tmp_path, True, 3.0, cmd=[sys.executable, "-c", script])
    assert record["status"] == "failed" and "killed with its process group" in record["detail"]["error"]
    assert time.monotonic() - started < 30
    for pid in map(int, pids.read_text().split()):
        assert not _is_running(pid), f"process {pid} outlived its stage"


def _is_running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie is gone, waiting to be reaped
    except psutil.NoSuchProcess:
        return False


def status_reason(records: list[dict], name: str) -> str:
    return next(r for r in records if r["name"] == name)["detail"]["reason"]
