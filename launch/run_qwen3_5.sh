#!/usr/bin/env bash
# The reference recipe on Qwen3.5: full SFT of a dense Qwen3.5 checkpoint (Qwen/Qwen3.5-9B by default) on the
# Pokemon captions data, 8 GPUs, packed, with the seed recipe's settings (launch/configs/qwen3_5_pokemon.yaml:
# lr 2e-5, warmup then cosine, grad clip 1.0) and ZeRO-3. Everything else is launch/run_qwen3_vl_2b.sh's: the
# same positional ZeRO word, environment and multi-node variables; flags on this command line win over the yaml.
#
#   bash launch/run_qwen3_5.sh                                   # Qwen3.5-9B, ZeRO-3 on 8 GPUs
#   MODEL=Qwen/Qwen3.5-2B bash launch/run_qwen3_5.sh zero2       # a smaller checkpoint, ZeRO-2
#   SP=2 bash launch/run_qwen3_5.sh                              # Ulysses over 2 GPUs (Gated DeltaNet included)
#
# Packing is exact on the hybrid tower: the Gated DeltaNet layers restart their conv window and recurrent state at
# every packed sample. With `pip install -e .[gpu]` (flash-linear-attention and causal-conv1d) they run FLA's varlen
# kernels; without them each packed sample runs through the layer's own PyTorch path, one at a time (correct,
# slower). The trainer's start-up log says which path it took (docs/models.md).
#
# Env: MODEL (Qwen/Qwen3.5-9B, or a local folder), ZERO (3), CONFIG (launch/configs/qwen3_5_pokemon.yaml),
# OUT (runs/qwen3_5_pokemon_zeroZERO), and every variable of launch/run_qwen3_vl_2b.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

export ZERO=${ZERO:-3}
case "${1:-}" in
  zero[0-3] | zero3_offload | zero3pp) ZERO=${1#zero}; shift ;;
esac
export MODEL=${MODEL:-Qwen/Qwen3.5-9B}
export CONFIG=${CONFIG:-launch/configs/qwen3_5_pokemon.yaml}
export OUT=${OUT:-runs/qwen3_5_pokemon_zero$ZERO}
exec bash launch/run_qwen3_vl_2b.sh "$@"
