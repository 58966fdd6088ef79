"""Preflight a dataset without GPUs: every record through the real readers, images and processor.

    python -m ds_vlm.validate --model MODEL --train_data SPEC [trainer flags] [--world_size N]
                              [--workers 2] [--max_bad 0] [--show 10] [--dump FILE.jsonl [--dump_records 20]]

Takes the trainer's flags (or --config F.yaml), so it checks exactly what the run would
see (and its results go to the data cache, where the run then finds them; --preflight
works as in training): counts by kind (ok, missing_image, unreadable_image, placeholder_mismatch,
no_assistant_turn, too_long, bad_record), the first offenders with file and record index,
histograms of token length and image tokens, and the steps per epoch for the batch
settings. Exits 1 when the bad records exceed --max_bad. --dump writes the first records as the model
sees them (data/dump.py), one JSON line each.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import replace

from ds_vlm.config import AUTO_BUDGET, ConfigError
from ds_vlm.data.encode import encoder_for
from ds_vlm.data.preflight import OK, preflight, summarize
from ds_vlm.data.sources import RecordIndex
from ds_vlm.flags import load_tool_config


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    if not values:
        return ["  (no values)"]
    low, high = min(values), max(values)
    step = max(1, -(-(high - low + 1) // bins))
    counts = Counter((v - low) // step for v in values)
    peak = max(counts.values())
    return [f"  {low + b * step:>7}-{low + (b + 1) * step - 1:<7} {counts.get(b, 0):>7} "
            f"{'#' * round(width * counts.get(b, 0) / peak)}" for b in range(-(-(high - low + 1) // step))]


def _extra(parser) -> None:
    parser.add_argument("--world_size", type=int, default=1, help="ranks the run will use (for steps per epoch)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the check")
    parser.add_argument("--show", type=int, default=10, help="offenders to print")
    parser.add_argument("--dump", default="", help="write what the model sees of the first records to this JSONL "
                                                   "file: rendered text, learned spans, control tokens, images, notes")
    parser.add_argument("--dump_records", type=int, default=20, help="records --dump writes")


def main(argv=None) -> int:
    from transformers import AutoProcessor

    from ds_vlm.data.plan import make_plan
    from ds_vlm.data.specs import SpecError
    from ds_vlm.models import adapter_for, model_config
    from ds_vlm.parallel import ParallelLayout

    try:
        config, extra = load_tool_config(argv, _extra)
        start = time.perf_counter()
        data, model = config.data, config.model
        model_type = model_config(model.path, model.trust_remote_code).model_type
        adapter = adapter_for(model_type)  # UnsupportedModel (a ValueError) names the model type
        processor = AutoProcessor.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        encoder = encoder_for(processor, adapter, data)
    except (ConfigError, ValueError, OSError) as err:
        print(f"ds-vlm validate: error: {err}", file=sys.stderr)
        return 2
    try:
        records = RecordIndex(data.train_data, data.image_root, data.data_format, data.data_cache,
                              data.caption_prompt)
    except (SpecError, OSError, ValueError) as err:  # the spec or a file as a whole, named
        print(f"ds-vlm validate: error: {err}", file=sys.stderr)
        return 2
    if extra["dump"]:
        from ds_vlm.data.dump import dump_records

        written = dump_records(records, encoder, extra["dump"], extra["dump_records"])
        print(f"{extra['dump']}: {written} record(s) as the model sees them")
    checks, said = preflight(records, encoder, data.preflight, data.data_cache, extra["workers"], progress=True)
    elapsed = time.perf_counter() - start
    ok = checks.select(checks.kind == OK)
    bad = int(checks.bad.sum())
    print(f"{data.train_data}: {said}; {elapsed:.1f} s in all ({extra['workers']} workers)")
    print(summarize(checks, show=extra["show"]))
    print("token length (image tokens included):")
    print("\n".join(histogram(ok.n_tokens.tolist())))
    print("image tokens per sample:")
    print("\n".join(histogram(ok.n_image_tokens.tolist())))
    kept = checks.select(~checks.bad)  # with sample:N, the unchecked records count as usable
    if len(kept):
        layout = ParallelLayout(extra["world_size"], 0, config.parallel.sequence_parallel)
        auto = config.batch.max_tokens_per_batch == AUTO_BUDGET  # the trainer resolves it, from the model's memory
        batching = replace(config.batch, max_tokens_per_batch=0) if auto else config.batch
        plan = make_plan(batching, config.seed, layout.dp_size, records, kept)
        batch = (f"token budget {batching.max_tokens_per_batch}" if batching.max_tokens_per_batch else
                 f"global batch {plan.global_batch} = {config.batch.micro_batch_size} x {config.batch.grad_accum} x "
                 f"{layout.dp_size}")
        print(f"steps per epoch: {plan.steps_per_epoch} ({len(kept)} usable samples, {batch}"
              + ("; --max_tokens_per_batch auto is chosen by the trainer at start: `python -m ds_vlm.plan` says "
                 "what fits)" if auto else ")"))
    if bad > data.max_bad:
        print(f"FAIL: {bad} bad record(s) > --max_bad {data.max_bad}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
