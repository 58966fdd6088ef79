#!/usr/bin/env bash
# The built-in demo, offline: build a tiny Qwen3-VL and a synthetic captioning set, train it
# on 2 ranks with ZeRO-3, then print exact-match caption accuracy on held-out images.
#   OUT=runs/demo NUM_GPUS=2 bash launch/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}
NUM_GPUS=${NUM_GPUS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m ds_vlm.demo --out "$OUT" --train_size 5000 --test_size 200
deepspeed --num_gpus "$NUM_GPUS" launch/train.py --config launch/configs/demo.yaml \
  --model "$OUT/model" --train_data "$OUT/data/train.jsonl" --eval_data "$OUT/data/test.jsonl" \
  --output_dir "$OUT/run" "$@"
python -m ds_vlm.evaluate --model "$OUT/run/hf" --data "$OUT/data/test.jsonl" --out "$OUT/run/answers.jsonl" \
  --min_accuracy 0.9
