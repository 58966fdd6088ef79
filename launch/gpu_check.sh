#!/usr/bin/env bash
# The GPU check: Qwen3-VL-2B's architecture (random weights) trained in bf16 on one GPU at 8k, 16k, 32k and
# 64k tokens per step through this trainer's step; prints tokens/s, MFU, peak memory and the largest size
# that fits (ds_vlm/bench/gpu_check.py). Fits in ~5 minutes on one H200.
#
#   bash launch/gpu_check.sh [--sizes 8192,16384] [--steps 3] [--out gpu_check.json]
#
# On a machine with PyTorch and a GPU but no network and no deepspeed: build the wheels here first
# (`bash launch/gpu_wheels.sh`: deepspeed, transformers and what they need that such a machine lacks, into
# .whl/), carry .whl/ with the repository, and this script installs them into /tmp/site before running.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
exec python3 -m ds_vlm.bench.gpu_check "$@"
