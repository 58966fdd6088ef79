"""Run by tests/dist/test_loss.py under the DeepSpeed launcher (2 CPU ranks): for ZeRO-2 and ZeRO-3 (every
parameter partitioned) and each model given, one forward/backward with the trainer's chunked loss and one
with the full-logits reference, from the same weights; rank 0 writes the losses and the largest relative
difference between the two full gradients of every parameter."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from fixtures.numerics import full_logits_loss_sum
from fixtures.runs import ROOT

from ds_vlm.config import TrainConfig
from ds_vlm.data.batching import Collator, SFTDataset
from ds_vlm.data.encode import Encoder
from ds_vlm.data.sources import RecordIndex
from ds_vlm.models.loading import load_model, prepare_for_training
from ds_vlm.train.ds_config import DSSettings, resolve_ds_config
from ds_vlm.train.loss import LabelLoss, LabelRows
from ds_vlm.train.optim import param_groups

RANK_RECORDS = ([0, 1], [3])  # rank 1: one text-only record (the collator appends the dummy image)


def batches(loaded, data: str):
    encoder = Encoder(loaded.processor, loaded.adapter, 4096)
    dataset = SFTDataset(RecordIndex([data]), encoder)
    collate = Collator(encoder.tokenizer.pad_token_id, encoder.dummy())
    return [collate([dataset[i] for i in records]) for records in RANK_RECORDS]


def gradients(config: TrainConfig, ds_config: dict, data: str, reference: bool):
    loaded = load_model(config.model, DSSettings.of(json.loads(json.dumps(ds_config))), "sdpa")
    groups = prepare_for_training(loaded.model, loaded.adapter, config.model, checkpointing=False).groups
    loss = LabelLoss(loaded.model)
    engine, *_ = deepspeed.initialize(model=loaded.model, model_parameters=param_groups(groups, config.optim),
                                      config=ds_config)
    all_batches = batches(loaded, data)
    n_targets = sum(mb.targets for mb in all_batches)
    micro = all_batches[dist.get_rank()]
    if reference:
        summed = full_logits_loss_sum(engine(**micro.inputs).logits, micro.labels)
    else:
        summed = loss.loss_of(engine, micro.inputs, LabelRows.from_labels(micro.labels))
    engine.backward(summed * (dist.get_world_size() / n_targets), scale_wrt_gas=False)
    total = summed.detach().double()
    dist.all_reduce(total)
    grads = {name: safe_get_full_grad(param) for name, param in engine.module.named_parameters()
             if param.requires_grad}
    head = engine.module.get_output_embeddings().weight
    tied = head is engine.module.get_input_embeddings().weight
    engine.destroy()
    return float(total) / n_targets, {n: g.clone() for n, g in grads.items() if g is not None}, tied


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--models", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    zero3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    tmp = Path(tempfile.mkdtemp())
    (tmp / "zero3.json").write_text(json.dumps(zero3))
    results = []
    for stage, ds_path in ((2, ROOT / "ds_configs" / "zero2.json"), (3, tmp / "zero3.json")):
        for model in args.models.split(","):
            config = TrainConfig.from_keys(model=model, train_data=args.data, deepspeed=str(ds_path), precision="fp32",
                                           micro_batch_size=2, train_vision="all", grad_clip=0.0).validate()
            ds_config = resolve_ds_config(config, dist.get_world_size())
            loss_full, ref, tied = gradients(config, ds_config, args.data, reference=True)
            loss_chunked, new, _ = gradients(config, ds_config, args.data, reference=False)
            largest = max(float(g.abs().max()) for g in ref.values())  # floor: see test_chunked_loss_equals...
            worst = max(float((new[n] - g).abs().max()) / max(float(g.abs().max()), 1e-3 * largest)
                        for n, g in ref.items())
            head = [n for n in ref if n.endswith("lm_head.weight") or (tied and n.endswith("embed_tokens.weight"))]
            results.append({"stage": stage, "tied": tied, "loss_full": loss_full, "loss_chunked": loss_chunked,
                            "n_grads": len(ref), "same_names": sorted(ref) == sorted(new),
                            "max_rel_grad_diff": worst, "head_grad_norm": float(ref[head[0]].norm())})
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
