"""Does data loading keep up with training? Measured in one run, on this machine.

    python -m benchmarks.loader --model runs/demo/model --data runs/demo/data/train.jsonl \
        [--records 800] [--micro_batch_size 8] [--out bench_loader.json]

Times the real pipeline (record -> image decode -> chat template + processor -> collate)
with 0, 1 and 2 DataLoader workers, and a forward+backward+AdamW step of the model on the
same batches in this process. Prints records/s per worker count and the ratio
loader-time / step-time per batch (below 1: loading keeps up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ds_vlm.data.batching import Collator, SFTDataset
    from ds_vlm.data.encode import Encoder
    from ds_vlm.data.sources import RecordIndex
    from ds_vlm.models import adapter_for
    from ds_vlm.train.loss import LabelLoss, LabelRows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--records", type=int, default=800)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    processor = AutoProcessor.from_pretrained(args.model)
    adapter = adapter_for(AutoConfig.from_pretrained(args.model).model_type)
    encoder = Encoder(processor, adapter, args.max_length)
    records = RecordIndex(args.data)
    dataset = SFTDataset(records, encoder, list(range(min(args.records, len(records)))))
    collate = Collator(processor.tokenizer.pad_token_id, encoder.dummy())
    batches = [list(range(i, min(i + args.micro_batch_size, len(dataset))))
               for i in range(0, len(dataset), args.micro_batch_size)]

    rows = {}
    for workers in (0, 1, 2):
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                            worker_init_fn=(lambda _: torch.set_num_threads(1)) if workers else None)
        start = time.perf_counter()
        count = sum(micro.samples for micro in loader)
        elapsed = time.perf_counter() - start
        rows[workers] = {"records_per_s": count / elapsed, "s_per_batch": elapsed / len(batches)}

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    label_loss = LabelLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sample_batches = [collate([dataset[i] for i in b]) for b in batches[:12]]
    times = []
    for micro in sample_batches:
        start = time.perf_counter()
        loss = label_loss.loss_of(model, micro.inputs, LabelRows.from_labels(micro.labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    step = sorted(times[2:])[len(times[2:]) // 2]  # median after warm-up

    print(f"{len(dataset)} records of {args.data}, micro-batch {args.micro_batch_size}")
    print(f"{'workers':>8} {'records/s':>10} {'s/batch':>9} {'load/step':>10}")
    for workers, row in rows.items():
        row["load_over_step"] = row["s_per_batch"] / step
        print(f"{workers:>8} {row['records_per_s']:>10.0f} {row['s_per_batch']:>9.4f} {row['load_over_step']:>10.2f}")
    print(f"model step (forward+backward+AdamW, 1 process): {step:.4f} s/batch")
    keeps_up = min(rows, key=lambda w: rows[w]["load_over_step"])
    verdict = ("keeps up" if rows[keeps_up]["load_over_step"] < 1 else "does NOT keep up")
    print(f"loading {verdict} with {keeps_up} worker(s) (load/step {rows[keeps_up]['load_over_step']:.2f}); "
          "a ratio below 1 means a worker prepares a batch faster than the step consumes it")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workers": rows, "step_s": step, "micro_batch_size": args.micro_batch_size}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
