#!/usr/bin/env bash
# Wheels for launch/gpu_check.sh on a GPU machine without network or deepspeed (Python 3.12, x86-64, with
# PyTorch 2.11, torchvision, accelerate, tokenizers, safetensors and huggingface-hub already there):
# deepspeed (a source package: its wheel is built here), transformers and peft at the tested versions,
# deepspeed's pydantic (with typing-extensions) and hjson, what the evaluation needs (rouge-score, a source
# package built here, with nltk; regex at the version transformers checks for at import), liger-kernel (for
# --loss liger) and FLA (flash-linear-attention + fla-core: Qwen3.5's packed linear attention), into .whl/ (~24 MiB);
# bitsandbytes (for QLoRA, ~41 MiB) into .whl_qlora/: with .whl/ it would pass the 64 MiB a device call carries,
# so the second call of the check carries it alone (the first call's installs stay in /tmp/site on the warm
# machine). WITH_BNB=0 leaves it out. Both folders are ignored by git. The check's first stage prints the
# versions it found there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl .whl_qlora && mkdir -p .whl
python -m pip wheel -q --no-deps -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}" rouge-score==0.1.2
fetch() {
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@"
}
fetch transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
      typing-inspection==0.4.5 typing-extensions==4.15.0 hjson==3.1.0 liger-kernel==0.8.5 \
      nltk==3.9.2 "regex==$(python -c 'import regex; print(regex.__version__)')" \
      flash-linear-attention==0.6.0 fla-core==0.6.0
if [[ "${WITH_BNB:-1}" != 0 ]]; then
  mkdir -p .whl_qlora
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl_qlora bitsandbytes==0.50.2
fi
repo=$(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1)
for folder in .whl .whl_qlora; do
  [[ -d $folder ]] || continue
  size=$(du -sm "$folder" | cut -f1)
  echo "$folder: ${size} MiB (+ ${repo} MiB of repository; a call carries 64 MiB)"
  if (( size + repo > 63 )); then echo "gpu_wheels.sh: $folder is too large to carry" >&2; exit 1; fi
done
ls -la .whl .whl_qlora 2>/dev/null || true
