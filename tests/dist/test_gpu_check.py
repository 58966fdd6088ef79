"""launch/gpu_check.sh's dry run: every stage a CPU can run, passing."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, start_zygote, train_env


def test_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    """`bash launch/gpu_check.sh --dry_run`: every stage that can run on a CPU runs (the real entry on ZeRO-2 and
    ZeRO-3, packed; exact resume; the export reloaded and generating; LoRA; the sweep's path on the tiny model;
    the plan at the sweep's sizes)
    and passes; the CUDA-only ones are skipped with the reason; the JSON has one record per stage."""
    out = tmp_path / "check.json"
    start_zygote()
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--dry_run", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT,
                          env=train_env({"PYTHON": sys.executable,
                                         "DS_VLM_GPU_CHECK_RANKS": str(ROOT / "tests" / "scripts" / "ranks.py")}),
                          capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads(out.read_text())["stages"]}
    assert list(stages) == ["train_zero2", "train_zero3", "save_resume", "export", "lora", "qlora", "liger",
                            "sweep_2b", "plan", "deepspeed_features"]
    cuda_only = {"qlora", "liger", "deepspeed_features"}
    assert {n for n, s in stages.items() if s["status"] == "skipped"} == cuda_only
    assert all(s["status"] == "ok" for n, s in stages.items() if n not in cuda_only)
    assert all("CUDA only" in stages[n]["detail"]["reason"] for n in cuda_only)
    for name in ("train_zero2", "train_zero3"):
        detail = stages[name]["detail"]
        assert len(detail["losses"]) == 4 and detail["backend"] == "gloo"
        assert detail["attention"] == "varlen interface: per-sample sdpa on the CPU"
        assert detail["optimizer"] == "DeepSpeed FusedAdam"
    assert stages["save_resume"]["detail"]["max_rel_difference"] < 1e-5
    assert stages["export"]["detail"]["answer"]
    sweep = stages["sweep_2b"]["detail"]
    assert [r["status"] for r in sweep["rows"]] == ["ok", "ok"] and sweep["largest_tokens"] > 0
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in sweep["rows"])
    # the plan at the sweep's sizes against what each measured (the path; on a GPU the stage holds it to 10%)
    planned = stages["plan"]["detail"]["rows"]
    assert [r["tokens"] for r in planned] == [r["tokens"] for r in sweep["rows"]]
    assert all(r["planned_gb"] > 0 and r["measured_gb"] > 0 for r in planned), planned
