#!/usr/bin/env bash
# Wheels for launch/gpu_check.sh on a GPU machine without network or deepspeed (Python 3.12, x86-64, with
# PyTorch 2.11, torchvision, accelerate, tokenizers, safetensors and huggingface-hub already there):
# deepspeed (a source package: its wheel is built here), transformers and peft at the tested versions,
# deepspeed's pydantic (with typing-extensions) and hjson, liger-kernel (for --loss liger) and, if the folder
# and the repository together stay under the 64 MiB a device call carries (1 MiB kept spare), bitsandbytes
# (for QLoRA; ~43 MB: WITH_BNB=0 leaves it out). Into .whl/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python -m pip wheel -q --no-deps -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
fetch() {
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@"
}
fetch transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
      typing-inspection==0.4.5 typing-extensions==4.15.0 hjson==3.1.0 liger-kernel==0.8.5
if [[ "${WITH_BNB:-1}" != 0 ]]; then
  fetch bitsandbytes==0.50.2
  total=$(du -sm .whl | cut -f1)
  repo=$(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1)
  if (( total + repo > 63 )); then
    echo "gpu_wheels.sh: with bitsandbytes .whl/ is ${total} MiB + ${repo} MiB of repository (> 63): leaving it" \
         "out (qlora will be skipped)" >&2
    rm -f .whl/bitsandbytes-*.whl
  fi
fi
ls -la .whl
du -sh .whl
