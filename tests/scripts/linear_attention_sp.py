"""Rank script (tests/dist/test_linear_attention.py): tiny hybrid Qwen3.5 and Qwen3.5-MoE language models on 2 CPU
ranks under sequence parallelism 2 (Ulysses for the full-attention layer, the Gated DeltaNet layers' own
all-to-alls) against the same model on one rank (each rank computes that too). Rank 0 writes the largest
differences of the loss and of every gradient, relative to their scale, as JSON to the path given."""

from __future__ import annotations

import json
import sys

import torch


def row_targets(ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Next-token targets within each sample of every row (-100 at each sample's last token)."""
    targets = torch.full_like(ids, -100)
    start = 0
    for n in lengths:
        targets[:, start:start + n - 1] = ids[:, start + 1:start + n]
        start += n
    return targets


def summed_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def compare(model, sp, boundaries, ids: torch.Tensor, lengths: list[int]) -> dict:
    """One rank against the SP group on the row(s) `ids` of samples `lengths`: the loss's relative difference and
    each gradient's largest difference relative to its largest value."""
    import ds_vlm.runtime.distributed as comm

    positions = torch.cat([torch.arange(n) for n in lengths])[None].expand(ids.shape[0], -1)
    targets = row_targets(ids, lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32) if len(lengths) > 1 else None
    results = []
    for sliced in (False, True):
        model.zero_grad()
        embeds = model.get_input_embeddings()(ids)  # the slicing hook takes embeddings, as a VLM's tower gets them
        with boundaries.armed(cu, max(lengths)):
            if sliced:
                with sp.arming():
                    logits = model(inputs_embeds=embeds, position_ids=positions).logits
                start, end = sp.bounds(ids.shape[1])
                loss = summed_loss(logits, targets[:, start:end])
            else:
                loss = summed_loss(model(inputs_embeds=embeds, position_ids=positions).logits, targets)
        loss.backward()
        loss = loss.detach().double()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
        if sliced:  # each rank's share of the loss and of every gradient
            for tensor in (loss, *grads.values()):
                comm.all_reduce(tensor)
        results.append((loss.item(), grads))
    (one_loss, one), (sp_loss, split) = results
    return {"loss": abs(sp_loss - one_loss) / abs(one_loss), "missing": sorted(set(one) ^ set(split)),
            "grads": {n: float((split[n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                      for n, g in one.items() if n in split}}


def main(out_path: str) -> None:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM

    import ds_vlm.runtime.distributed as comm
    from ds_vlm.models.base import Adapter
    from ds_vlm.parallel import ParallelLayout
    from ds_vlm.parallel.attention import SampleBoundaries
    from ds_vlm.parallel.ulysses import SequenceParallel
    from ds_vlm.testing.hybrid import tiny_hybrid_text_config

    comm.init_distributed(120)
    rank = comm.rank()
    sp = SequenceParallel.joined(ParallelLayout(2, rank, 2))
    generator = torch.Generator().manual_seed(1)
    cases = {"packed": (torch.randint(0, 128, (1, 100), generator=generator), [70, 30]),  # A past a 64-token chunk
             "two rows": (torch.randint(0, 128, (2, 64), generator=generator), [64])}
    report = {}
    for moe in (False, True):
        config = tiny_hybrid_text_config(moe=moe)
        config._attn_implementation = sp.attn_implementation("varlen", config)["text_config"]
        torch.manual_seed(0)
        model = (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(config).train()
        sp.install(model.model, Adapter())
        boundaries = SampleBoundaries(model.model, stand_in_mask=True)
        # float64 outside transformers' float32 delta rule and norms; the MoE tower in float32 only (its experts'
        # grouped_mm takes no float64)
        for dtype in (torch.float32,) if moe else (torch.float64, torch.float32):
            model.to(dtype)
            for name, (ids, lengths) in cases.items():
                report[f"{'moe' if moe else 'dense'}, {name}, {dtype}"] = compare(model, sp, boundaries, ids,
                                                                                  lengths)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
