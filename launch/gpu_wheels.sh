#!/usr/bin/env bash
# Wheels for launch/gpu_check.sh on a GPU machine without network or deepspeed (Python 3.12, x86-64, with
# PyTorch, accelerate, tokenizers, safetensors and huggingface-hub already there): deepspeed (a source
# package: its wheel is built here), transformers at the tested version, deepspeed's pydantic and hjson, and
# liger-kernel (for --loss liger). Into .whl/ (ignored by git), ~20 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python -m pip wheel -q --no-deps -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
for spec in transformers==5.24.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
            typing-inspection==0.4.5 hjson==3.1.0 liger-kernel==0.8.5; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
