"""The global-batch plan: every sample once per epoch, token budgets."""

from __future__ import annotations

import pytest

from ds_vlm.data.plan import BatchPlan, TokenBudgetPlan


@pytest.mark.parametrize("n,mb,ga,world", [(10, 1, 1, 2), (37, 2, 3, 2), (8, 4, 1, 1), (9, 1, 2, 4)])
def test_batch_plan_covers_each_sample_once_per_epoch(n, mb, ga, world):
    plan = BatchPlan(n, mb, ga, world, seed=3)
    for epoch in range(2):
        seen = []
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            per_rank = [plan.micro_batches(step, r) for r in range(world)]
            assert all(len(m) == ga for m in per_rank)
            step_samples = [i for m in per_rank for mb_ in m for i in mb_]
            assert sorted(step_samples) == sorted(plan.step_samples(step))
            seen += step_samples
        assert sorted(seen) == list(range(n))
    # the same global batches whatever the world size (what resuming on another size relies on)
    other = BatchPlan(n, mb * world, ga, 1, seed=3)
    assert [sorted(plan.step_samples(s)) for s in range(5)] == [sorted(other.step_samples(s)) for s in range(5)]


def test_token_budget_counts_real_tokens_when_packing():
    lengths = [30, 50, 70, 90, 110, 130, 150, 170] * 8
    padded = TokenBudgetPlan(len(lengths), 1, 1, 2, seed=0, lengths=lengths, max_tokens=400)
    packed = TokenBudgetPlan(len(lengths), 1, 1, 2, seed=0, lengths=lengths, max_tokens=400, packing=True)
    for plan, cost in ((padded, lambda mb: max(lengths[i] for i in mb) * len(mb)),
                       (packed, lambda mb: sum(lengths[i] for i in mb))):
        micro = plan.epoch_micro_batches(0)
        assert sorted(i for mb in micro for i in mb) == list(range(len(lengths)))
        assert all(cost(mb) <= 400 for mb in micro if len(mb) > 1)
    assert len(packed.epoch_micro_batches(0)) < len(padded.epoch_micro_batches(0))


def test_token_budget_batches_cover_the_epoch_and_pad_less():
    import random

    rng = random.Random(0)
    lengths = [rng.choice([40, 60, 90, 150, 300]) + rng.randint(0, 20) for _ in range(400)]
    budget = 1280
    plan = TokenBudgetPlan(len(lengths), 4, 1, 2, seed=0, lengths=lengths, max_tokens=budget)
    fixed = BatchPlan(len(lengths), 4, 1, 2, seed=0)

    def computed(p) -> tuple[int, list[int]]:
        total, seen = 0, []
        for step in range(p.steps_per_epoch):
            for mb in p.micro_batches(step, None):
                seen += mb
                total += max((lengths[i] for i in mb), default=0) * len(mb)
        return total, seen

    budget_tokens, seen = computed(plan)
    fixed_tokens, _ = computed(fixed)
    assert sorted(seen) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in mb) * len(mb) <= budget
               for s in range(plan.steps_per_epoch) for mb in plan.micro_batches(s, None) if len(mb) > 1)
    assert budget_tokens <= 0.75 * fixed_tokens, (budget_tokens, fixed_tokens)
    # later epochs pack their own order into a step or two more or fewer: every step still holds samples,
    # every epoch holds each sample once (a step with no sample at all once divided the loss by zero)
    epoch_steps = [plan.epoch_steps(e) for e in range(6)]
    assert len(set(epoch_steps)) > 1 and plan.steps_in(6) == sum(epoch_steps)
    start = 0
    for steps in epoch_steps:
        batches = [plan.micro_batches(s, None) for s in range(start, start + steps)]
        assert all(any(mb for mb in step) for step in batches)
        assert sorted(i for step in batches for mb in step for i in mb) == list(range(len(lengths)))
        start += steps
