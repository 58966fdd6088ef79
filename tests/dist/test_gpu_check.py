"""launch/gpu_check.sh's dry run: every stage a CPU can run, passing, in priority order within a budget."""

from __future__ import annotations

import json
import subprocess
import sys

from fixtures.runs import ROOT, start_zygote, train_env

FIRST_PART = ["imports", "train_zero2", "save_resume", "export", "eval"]


def test_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    """`bash launch/gpu_check.sh --dry_run --budget_s 420`: the stages in priority order; the first part (imports,
    the real entry on ZeRO-2 packed, exact resume, the export reloaded and generating, a ZeRO-3 run with
    evaluation and its HTML report) plans 420 s at most and runs and passes here; the CUDA-only stages are
    skipped with the reason; every record carries planned_s; the JSON is complete."""
    out = tmp_path / "check.json"
    start_zygote()
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--dry_run", "--budget_s", "420",
                           "--out", str(out), "--workdir", str(tmp_path / "work")], cwd=ROOT,
                          env=train_env({"PYTHON": sys.executable,
                                         "DS_VLM_GPU_CHECK_RANKS": str(ROOT / "tests" / "scripts" / "ranks.py")}),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert report["complete"] and report["budget_s"] == 420
    assert list(stages) == FIRST_PART + ["qlora", "lora", "qwen3_5", "liger", "sweep_2b", "plan", "deepspeed_features"]
    assert sum(stages[n]["planned_s"] for n in FIRST_PART) <= 420
    assert all(stages[n]["status"] == "ok" for n in FIRST_PART), {n: stages[n]["detail"] for n in FIRST_PART}
    for name in ("liger", "deepspeed_features"):
        assert stages[name]["status"] == "skipped" and "CUDA only" in stages[name]["detail"]["reason"]
    assert stages["qlora"]["status"] == "skipped" and "test_lora.py" in stages["qlora"]["detail"]["reason"]
    assert stages["qwen3_5"]["status"] == "skipped" and "test_batching.py" in stages["qwen3_5"]["detail"]["reason"]
    # the rest ran where the budget left room on this CPU, else waits for the next call: never failed
    assert all(s["status"] in ("ok", "skipped", "not_run") for s in stages.values())
    versions = stages["imports"]["detail"]["versions"]
    assert all(versions[m] for m in ("torch", "deepspeed", "transformers", "rouge_score", "nltk", "regex"))
    detail = stages["train_zero2"]["detail"]
    assert len(detail["losses"]) == 4 and detail["backend"] == "gloo"
    assert detail["attention"] == "varlen interface: per-sample sdpa on the CPU"
    assert detail["optimizer"] == "DeepSpeed FusedAdam"
    assert stages["save_resume"]["detail"]["max_rel_difference"] < 1e-5
    assert stages["export"]["detail"]["answer"]
    evaluation = stages["eval"]["detail"]
    assert evaluation["answers"] == 2 and evaluation["report_bytes"] > 0 and evaluation["eval_loss"] > 0
    if stages["sweep_2b"]["status"] == "ok":
        sweep = stages["sweep_2b"]["detail"]
        assert [r["status"] for r in sweep["rows"]] == ["ok", "ok"] and sweep["largest_tokens"] > 0
        assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in sweep["rows"])
    if stages["plan"]["status"] == "ok":  # the plan at the sweep's sizes (on a GPU the stage holds it to 10%)
        planned = stages["plan"]["detail"]["rows"]
        assert all(r["planned_gb"] > 0 and r["measured_gb"] > 0 for r in planned), planned
