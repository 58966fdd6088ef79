#!/usr/bin/env bash
# The acceptance script for a short GPU lease (benchmarks/gpu_check.py): stages in priority order (imports,
# the real entry on ZeRO-2, exact resume, the HF export generating, a ZeRO-3 run with evaluation and its report,
# QLoRA, LoRA, liger, the Qwen3-VL-2B sweep, the planner against it, ZeRO++'s quantized communication and Muon in
# bf16), each in its own process group with its own budget, started only if it fits what is left of --budget_s;
# the JSON is rewritten after every stage.
#
#   bash launch/gpu_check.sh --budget_s 420 --out gpu_check.json --workdir runs/gpu_check       # the first call
#   bash launch/gpu_check.sh --budget_s 330 --resume gpu_check.json --out gpu_check.json \
#        --workdir runs/gpu_check                                        # the second, at once: the rest
#   bash launch/gpu_check.sh --dry_run          # on a CPU: the tiny model, the CUDA-only stages skipped
#
# On a machine with PyTorch and a GPU but no network and no deepspeed: build the wheels here first
# (`bash launch/gpu_wheels.sh`: deepspeed, transformers and what they need that such a machine lacks, into
# .whl/), carry .whl/ with the repository, and this script installs them into /tmp/site before running.
set -euo pipefail
# the budget counts from here: the wheels' install is device time too
export DS_VLM_GPU_CHECK_T0="${DS_VLM_GPU_CHECK_T0:-$(date +%s.%N)}"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" > /dev/null || PYTHON=python
# the carried wheels are for a machine without deepspeed (Python 3.12): installed only there, into /tmp/site,
# which a second call on the still-warm machine finds again (it then carries .whl_qlora/ alone)
SITE=/tmp/site
[[ -d $SITE ]] && export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
install() { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
if compgen -G ".whl/*.whl" > /dev/null && ! "$PYTHON" -c "import deepspeed" 2> /dev/null; then
  install .whl/*.whl
fi
if compgen -G ".whl_qlora/*.whl" > /dev/null && ! "$PYTHON" -c "import bitsandbytes" 2> /dev/null; then
  install .whl_qlora/*.whl
fi
[[ -d $SITE ]] && export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.gpu_check "$@"
