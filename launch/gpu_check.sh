#!/usr/bin/env bash
# The acceptance script for one short GPU run (ds_vlm/bench/gpu_check.py): each stage in its own process with
# its own time budget, under 8 minutes on one GPU in all: the real entry on ZeRO-2 and ZeRO-3 (bf16, NCCL,
# packed), exact resume, the HF export reloaded, LoRA, QLoRA, liger against the chunked loss, the
# Qwen3-VL-2B architecture's sweep (tokens/s, MFU, peak memory, the largest size that fits), and ZeRO++'s
# quantized communication and Muon in bf16 (deepspeed_features).
#
#   bash launch/gpu_check.sh [--stages train_zero2,sweep_2b] [--out gpu_check.json] [--workdir DIR]
#   bash launch/gpu_check.sh --dry_run          # on a CPU: the tiny model, the CUDA-only stages skipped
#
# On a machine with PyTorch and a GPU but no network and no deepspeed: build the wheels here first
# (`bash launch/gpu_wheels.sh`: deepspeed, transformers and what they need that such a machine lacks, into
# .whl/), carry .whl/ with the repository, and this script installs them into /tmp/site before running.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" > /dev/null || PYTHON=python
# the carried wheels are for a machine without deepspeed (Python 3.12): installed only there
if compgen -G ".whl/*.whl" > /dev/null && ! "$PYTHON" -c "import deepspeed" 2> /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m ds_vlm.bench.gpu_check "$@"
