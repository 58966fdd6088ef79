#!/usr/bin/env bash
# Reference recipe: full SFT of Qwen3-VL-2B-Instruct on the Pokemon captions data on one node of
# 8 GPUs with the seed recipe's settings (launch/configs/qwen3_vl_2b_pokemon.yaml): ZeRO-2, packed
# micro-batches of up to 16,384 real tokens per GPU, lr 2e-5, AdamW (0.9, 0.95) with weight decay 0.1,
# warmup then cosine to 0.1 of the peak, grad clip 1.0, the full model trained with activation
# checkpointing. Prepares the data first if it is missing.
#
#   bash launch/run_qwen3_vl_2b.sh                      # ZeRO-2 on 8 GPUs
#   bash launch/run_qwen3_vl_2b.sh zero3                # ZeRO-3 instead (same as ZERO=3)
#   SP=2 bash launch/run_qwen3_vl_2b.sh                 # every sequence split over 2 GPUs (Ulysses), 4 groups
#   NUM_GPUS=4 bash launch/run_qwen3_vl_2b.sh --micro_batch_size 8 --epochs 1   # flags win over the yaml
#   HOSTFILE=launch/hostfile bash launch/run_qwen3_vl_2b.sh                      # several nodes over ssh
#   NODE_RANK=$SLURM_NODEID NNODES=2 MASTER_ADDR=node0 bash launch/run_qwen3_vl_2b.sh  # one launcher per node
#   NODE_RANK=$SLURM_NODEID NNODES=2 MASTER_ADDR=node0 bash launch/run_qwen3_vl_2b.sh zero3pp  # ZeRO++ (docs/multinode.md)
#
# Env: ZERO (2; 0-3, 3_offload or 3pp: ds_configs/zeroZERO.json), SP (1: sequence-parallel group size), NUM_GPUS (8 per node), MODEL
# (Qwen/Qwen3-VL-2B-Instruct, or a local folder), DATA (data/pokemon: train.jsonl + test.jsonl),
# OUT (runs/qwen3_vl_2b_pokemon_zeroZERO), CONFIG (the yaml), MASTER_PORT (29500), DEEPSPEED
# (launcher command), DRY_RUN=1: print the commands instead of running them. Multi-node: HOSTFILE,
# NODE_RANK, NNODES, MASTER_ADDR, INCLUDE, EXCLUDE, LAUNCHER_ARGS (see launch/run_multinode.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/lib.sh
launcher_cmd

ZERO=${ZERO:-2}
case "${1:-}" in
  zero[0-3] | zero3_offload | zero3pp) ZERO=${1#zero}; shift ;;
esac
NUM_GPUS=${NUM_GPUS:-8}
MODEL=${MODEL:-Qwen/Qwen3-VL-2B-Instruct}
DATA=${DATA:-data/pokemon}
OUT=${OUT:-runs/qwen3_vl_2b_pokemon_zero$ZERO}
CONFIG=${CONFIG:-launch/configs/qwen3_vl_2b_pokemon.yaml}
DS_JSON=ds_configs/zero$ZERO.json
if [[ ! -f $DS_JSON ]]; then
  echo "run_qwen3_vl_2b.sh: ZERO=$ZERO: no $DS_JSON (use 0, 1, 2, 3, 3_offload or 3pp)" >&2
  exit 2
fi

if [[ ! -f $DATA/train.jsonl ]]; then  # llamafactory/pokemon-gpt4o-captions from the hub (needs network)
  if [[ "${DRY_RUN:-0}" != 0 ]]; then
    printf '%q ' python launch/prepare_pokemon.py --out "$DATA"; printf '\n'
  else
    python launch/prepare_pokemon.py --out "$DATA"
  fi
fi

SP=${SP:-1}
train_flags=(--config "$CONFIG" --model "$MODEL" --train_data "$DATA/train.jsonl" --eval_data "$DATA/test.jsonl"
             --deepspeed "$DS_JSON" --output_dir "$OUT" --sequence_parallel "$SP" "$@")
if [[ -n "${HOSTFILE:-}${NODE_RANK:-}${NNODES:-}" ]] || (( ${SLURM_NNODES:-1} > 1 )); then
  export GPUS_PER_NODE=${GPUS_PER_NODE:-$NUM_GPUS}
  exec bash launch/run_multinode.sh "${train_flags[@]}"
fi
run_launcher group "${LAUNCHER[@]}" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" launch/train.py \
  "${train_flags[@]}"
