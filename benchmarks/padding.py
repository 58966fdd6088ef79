"""Padding without training: fixed micro-batches (BatchPlan) against token-budget ones (TokenBudgetPlan), padded
and packed."""

from __future__ import annotations

import math

TOKEN_BUDGET_TARGET = 0.25  # token-budget batches compute at least this much less than fixed ones


def plan_cost(micro_batches: list[list[int]], lengths: list[int], packed: bool = False) -> dict:
    """Tokens a forward computes (longest x count per micro-batch, padding included; packed: the sum of the
    lengths) against real ones."""
    batches = [mb for mb in micro_batches if mb]
    cost = (lambda mb: sum(lengths[i] for i in mb)) if packed else (lambda mb: max(lengths[i] for i in mb) * len(mb))
    computed = sum(cost(mb) for mb in batches)
    real = sum(lengths[i] for mb in batches for i in mb)
    return {"micro_batches": len(batches), "samples": sum(len(mb) for mb in batches),
            "mean_samples_per_micro_batch": sum(len(mb) for mb in batches) / len(batches),
            "real_tokens": real, "computed_tokens": computed, "padding_efficiency": real / computed,
            "largest_micro_batch_tokens": max(cost(mb) for mb in batches)}


def default_token_budget(lengths: list[int], micro_batch_size: int) -> int:
    """micro_batch_size x the mean length (the fixed batches' real tokens per micro-batch), at least the
    longest sample (a valid --max_tokens_per_batch with --max_length >= the longest), rounded up to 64."""
    budget = max(micro_batch_size * sum(lengths) / len(lengths), max(lengths))
    return int(math.ceil(budget / 64) * 64)


def padding_report(lengths: list[int], micro_batch_size: int, world_size: int, max_tokens: int = 0,
                   seed: int = 42) -> dict:
    """Fixed micro-batches (BatchPlan) against token-budget ones (TokenBudgetPlan) over one epoch: the same
    samples, each once."""
    from ds_vlm.data.plan import BatchPlan, TokenBudgetPlan

    max_tokens = max_tokens or default_token_budget(lengths, micro_batch_size)
    common = dict(n_samples=len(lengths), micro_batch_size=micro_batch_size, grad_accum=1, dp_size=world_size,
                  seed=seed)
    fixed = plan_cost(BatchPlan(**common).epoch_micro_batches(0), lengths)
    budget = plan_cost(TokenBudgetPlan(**common, lengths=lengths, max_tokens=max_tokens).epoch_micro_batches(0),
                       lengths)
    packed = plan_cost(TokenBudgetPlan(**common, lengths=lengths, max_tokens=max_tokens, packing=True
                                       ).epoch_micro_batches(0), lengths, packed=True)
    assert fixed["samples"] == budget["samples"] == packed["samples"] == len(lengths)
    saved = 1 - budget["computed_tokens"] / fixed["computed_tokens"]
    ordered = sorted(lengths)
    return {"records": len(lengths), "micro_batch_size": micro_batch_size, "world_size": world_size,
            "max_tokens_per_batch": max_tokens,
            "lengths": {"min": ordered[0], "median": ordered[len(ordered) // 2], "mean": sum(lengths) / len(lengths),
                        "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1]},
            "fixed": fixed, "token_budget": budget, "packed": packed, "computed_tokens_saved": saved,
            "target": TOKEN_BUDGET_TARGET, "target_met": saved >= TOKEN_BUDGET_TARGET}
