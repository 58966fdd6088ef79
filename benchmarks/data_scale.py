"""Data at scale: launch to first optimizer step, cold and warm, and peak RSS per rank, on a generated set.

    python -m benchmarks.data_scale --records 1000000 --out runs/bench_data.json [--ranks 2] [--baseline 5000]
                                [--work runs/bench_data] [--num_workers 1]

Writes a tiny model, a few hundred small images and N records (2 in 3 with an image, the rest text-only;
half in one JSONL file, half in one JSON list), then trains 1 step on `--ranks` CPU ranks, ZeRO-2, with a
fresh data cache (cold: the JSON list is indexed and every record preflighted) and again `--warm_rounds`
times with the same cache (warm). The same runs on `--baseline` records give the memory reference. Prints
and writes cold_start_s, warm_start_s (the worst warm round; every round is listed) and peak_rss_gb (per
rank, the rank processes' ru_maxrss as metrics.jsonl logs it; the largest over the warm rounds) against
the targets: warm start under 60 s, RSS at most 1 GB above the baseline's, in every round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runner import ROOT
from ds_vlm.runtime.distributed import free_port
from ds_vlm.runtime.launcher import launcher

WARM_TARGET_S, RSS_MARGIN_GB = 60.0, 1.0


def write_data(out: Path, records: int, n_images: int = 300, seed: int = 0) -> list[Path]:
    """N records in the Pokemon layout over `n_images` PNG files: <out>/data.jsonl and <out>/data.json."""
    from ds_vlm.demo import COLORS, PROMPT, SHAPES, caption, draw_shape

    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    kinds = []
    for i in range(n_images):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        path = images / f"{i:04d}.png"
        if not path.exists():
            draw_shape(color, shape, rng).save(path)
        kinds.append((color, shape))
    half = records // 2

    def record(i: int) -> str:
        if i % 3 == 2:
            color, shape = kinds[i % n_images]
            return json.dumps({"conversations": [{"from": "human", "value": f"Name a {color} {shape}."},
                                                 {"from": "gpt", "value": f"A {color} {shape}."}]})
        color, shape = kinds[i % n_images]
        return json.dumps({"conversations": [{"from": "human", "value": PROMPT},
                                             {"from": "gpt", "value": caption(color, shape)}],
                           "images": [f"images/{i % n_images:04d}.png"]})

    with open(out / "data.jsonl", "w") as f:
        for i in range(half):
            f.write(record(i) + "\n")
    with open(out / "data.json", "w") as f:
        f.write("[\n")
        for i in range(half, records):
            f.write(record(i) + (",\n" if i < records - 1 else "\n"))
        f.write("]\n")
    return [out / "data.jsonl", out / "data.json"]


def time_to_first_step(model: Path, data: list[Path], out: Path, cache: Path, ranks: int, num_workers: int,
                       timeout: int) -> dict:
    """One 1-step run: seconds from launch to the first optimizer step's metrics line, peak RSS per rank."""
    shutil.rmtree(out, ignore_errors=True)
    command = launcher(ranks, free_port()) + [
        str(ROOT / "launch" / "train.py"), "--model", str(model), "--train_data", ",".join(map(str, data)),
        "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--output_dir", str(out), "--max_steps", "1",
        "--micro_batch_size", "2", "--num_workers", str(num_workers), "--export_hf", "false",
        "--dist_timeout_s", str(timeout)]
    env = dict(os.environ, DS_VLM_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.time()
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"run in {out} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in lines if r.get("step") == 1 and "loss" in r)
    said = [line for line in proc.stderr.splitlines() if line.startswith("preflight ")]
    return {"start_s": round(first["time"] - start, 1), "peak_rss_gb": first["peak_mem_gb"], "preflight": said}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=5000, help="records of the memory reference run")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=1, help="DataLoader workers per rank")
    parser.add_argument("--work", default="runs/bench_data", help="generated data, runs and caches go here")
    parser.add_argument("--warm_rounds", type=int, default=3, help="warm starts per size (every one is reported; "
                                                                   "the targets hold only if they hold in all)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds one run may take")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    from ds_vlm.demo import build_model_dir

    work = Path(args.work).resolve()
    model = work / "model"
    if not (model / "config.json").exists():
        build_model_dir(model)
    result = {"records": args.records, "baseline_records": args.baseline, "ranks": args.ranks,
              "num_workers": args.num_workers, "cpus": os.cpu_count()}
    for name, count in (("baseline", args.baseline), ("large", args.records)):
        began = time.perf_counter()
        data = write_data(work / f"data_{count}", count)
        result[f"{name}_write_s"] = round(time.perf_counter() - began, 1)
        cache = work / f"cache_{count}"
        shutil.rmtree(cache, ignore_errors=True)
        for start in ["cold"] + [f"warm{i + 1}" for i in range(args.warm_rounds)]:
            run = time_to_first_step(model, data, work / f"run_{count}_{start}", cache, args.ranks, args.num_workers,
                                     args.timeout)
            result[f"{name}_{start}"] = run
            print(f"{count} records, {start}: {run['start_s']} s to the first step, peak RSS per rank "
                  f"{run['peak_rss_gb']} GB", flush=True)
            for line in run["preflight"]:
                print(f"    {line}", flush=True)
        warm = [result[f"{name}_warm{i + 1}"] for i in range(args.warm_rounds)]
        result[f"{name}_warm"] = {"start_s": max(r["start_s"] for r in warm),  # the worst round
                                  "rounds_start_s": [r["start_s"] for r in warm],
                                  "peak_rss_gb": [max(r["peak_rss_gb"][i] for r in warm) for i in range(args.ranks)]}
    large, base = result["large_warm"], result["baseline_warm"]
    result.update(cold_start_s=result["large_cold"]["start_s"], warm_start_s=large["start_s"],
                  peak_rss_gb=large["peak_rss_gb"], cold_peak_rss_gb=result["large_cold"]["peak_rss_gb"],
                  baseline_peak_rss_gb=base["peak_rss_gb"])
    rss_over = max(a - b for a, b in zip(large["peak_rss_gb"], base["peak_rss_gb"]))
    result["targets"] = {"warm_start_under_60s": large["start_s"] < WARM_TARGET_S,
                         "rss_at_most_1gb_over_baseline": rss_over <= RSS_MARGIN_GB}
    print(f"cold_start_s {result['cold_start_s']} (preflight of {args.records} records at the processor's speed)")
    print(f"warm_start_s {result['warm_start_s']}, the worst of rounds {large['rounds_start_s']} (target < "
          f"{WARM_TARGET_S:.0f}): "
          f"{'met' if result['targets']['warm_start_under_60s'] else 'NOT met'}")
    print(f"peak_rss_gb per rank {large['peak_rss_gb']} (warm; cold {result['cold_peak_rss_gb']}) vs "
          f"{base['peak_rss_gb']} on {args.baseline} records: +{rss_over:.2f} GB at most (target <= "
          f"+{RSS_MARGIN_GB:.0f} GB): {'met' if result['targets']['rss_at_most_1gb_over_baseline'] else 'NOT met'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
