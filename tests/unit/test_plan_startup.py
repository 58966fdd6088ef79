"""--max_tokens_per_batch auto: the search for the largest budget that fits, on a stand-in for the trace."""

from __future__ import annotations

import pytest

from ds_vlm.config import AUTO_BUDGET, BatchConfig, ConfigError, TrainConfig, token_budget
from ds_vlm.memplan.planner import ModelStates
from ds_vlm.memplan.startup import RunPlanner


def planner(peak_of_tokens, longest: int = 100) -> RunPlanner:
    """A RunPlanner whose trace is `peak_of_tokens(budget)` (bytes), 1 MB of model states."""
    plan = RunPlanner.__new__(RunPlanner)
    plan.config = TrainConfig.from_keys(model="m", train_data="d", max_tokens_per_batch=AUTO_BUDGET)
    plan.states = ModelStates(1e6, 0, 0, 0)
    plan.longest, plan.sp = longest, 1
    plan.peak = lambda batch: peak_of_tokens(batch.max_tokens_per_batch)
    return plan


def test_auto_takes_the_largest_whole_number_of_samples_that_fits_with_the_margin():
    linear = planner(lambda tokens: 1e6 + 1000 * tokens)  # 100 kB a sample of 100 tokens
    budget, said = linear.auto_budget(10e6)  # 9 MB usable: (9e6 - 1e6) / 1e5 = 80 samples
    assert budget == 80 * 100 and "80 x the longest sample" in said
    # activations that grow faster than the two traced points say: traced at the guess, stepped down
    steep = planner(lambda tokens: 1e6 + 1000 * tokens + 0.5 * tokens ** 2 / 100)
    budget, _ = steep.auto_budget(10e6)
    fits = [c for c in range(1, 200) if 1e6 + 1000 * c * 100 + 0.5 * (c * 100) ** 2 / 100 <= 9e6]
    assert budget // 100 <= max(fits) and budget // 100 >= 0.9 * max(fits), (budget, max(fits))


def test_auto_leaves_what_pytorch_cannot_have_on_a_gpu():
    """On a GPU the CUDA context and whatever else holds memory outside PyTorch (read after loading: total - free
    - reserved) and NCCL's buffers (an allowance, with more than one rank) come out of the budget, beside the 10%
    margin."""
    from ds_vlm.memplan.startup import NCCL_RESERVE, outside_torch

    gb = 1e9
    assert outside_torch(1, (80 * gb, 70 * gb, 9 * gb)) == pytest.approx(1 * gb)  # 1 GB of context
    assert outside_torch(8, (80 * gb, 70 * gb, 9 * gb)) == pytest.approx(1 * gb + NCCL_RESERVE)
    assert outside_torch(8, (80 * gb, 71 * gb, 9.5 * gb)) == pytest.approx(NCCL_RESERVE)  # never negative
    linear = planner(lambda tokens: 1e6 + 1000 * tokens)
    budget, said = linear.auto_budget(10e6, outside=2e6)  # 9 - 2 = 7 MB usable: (7e6 - 1e6) / 1e5 = 60 samples
    assert budget == 60 * 100 and "2.0 MB outside PyTorch: CUDA context, NCCL" in said


def test_auto_stops_when_not_even_one_sample_fits():
    with pytest.raises(ConfigError, match="even one sample of 100 tokens"):
        planner(lambda tokens: 1e6 + 1e6 * tokens).auto_budget(10e6)


def test_the_flag_takes_auto_and_numbers():
    assert token_budget("auto") == AUTO_BUDGET and token_budget("4096") == 4096
    config = TrainConfig.from_keys(model="m", train_data="d", max_tokens_per_batch=AUTO_BUDGET, max_length=512)
    assert config.validate(for_training=False).batch.max_tokens_per_batch == AUTO_BUDGET
    assert BatchConfig().plan_memory_gb == 0.0
    from ds_vlm.flags import load_config

    parsed = load_config(["--model", "m", "--train_data", "d", "--max_tokens_per_batch", "auto"])
    assert parsed.batch.max_tokens_per_batch == AUTO_BUDGET


def test_an_unresolved_auto_budget_never_plans_batches(demo_dir, capsys):
    """The batch plan refuses `auto` (-1 would be a budget); `validate`, which has no memory to fit, counts the
    steps by --micro_batch_size and says who chooses the budget."""
    import ds_vlm.data.validate as validate
    from ds_vlm.data.plan import make_plan

    with pytest.raises(ValueError, match="the trainer resolves it at start"):
        make_plan(BatchConfig(max_tokens_per_batch=AUTO_BUDGET), 0, 1, None, None)
    rc = validate.main(["--model", str(demo_dir / "model"), "--train_data", str(demo_dir / "data" / "train.jsonl"),
                        "--workers", "0", "--max_tokens_per_batch", "auto", "--max_length", "512"])
    out = capsys.readouterr().out
    assert rc == 0 and "global batch" in out and "--max_tokens_per_batch auto is chosen by the trainer" in out, out


def test_the_plan_at_start_returns_the_budget_and_leaves_the_config(monkeypatch, tmp_path):
    """A value, not a side effect: `--max_tokens_per_batch auto` on a resumed run comes back in the StartPlan
    (the checkpoint's number, with the line that says so); the config is left as it was, for the trainer to
    assign."""
    from types import SimpleNamespace

    import ds_vlm.checkpoint.resume as resume
    from ds_vlm.memplan.startup import StartPlan, plan_at_start

    config = TrainConfig.from_keys(model="m", train_data="d", max_tokens_per_batch=AUTO_BUDGET, plan_at_start=False)
    found = tmp_path / "step_00000010"
    monkeypatch.setattr(resume, "resume_source", lambda checkpoint: found)
    monkeypatch.setattr(resume, "read_meta", lambda path: SimpleNamespace(
        run=SimpleNamespace(config={"max_tokens_per_batch": 4096})))
    start = plan_at_start(config, None, None, 1, None, None)
    assert start == StartPlan(4096, ["--max_tokens_per_batch auto: 4096, as the checkpoint step_00000010 recorded it"])
    assert config.batch.max_tokens_per_batch == AUTO_BUDGET
    fixed = TrainConfig.from_keys(model="m", train_data="d", max_tokens_per_batch=2048, plan_at_start=False)
    assert plan_at_start(fixed, None, None, 1, None, None) == StartPlan(2048, [])
