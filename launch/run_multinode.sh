#!/usr/bin/env bash
# Train across several nodes with DeepSpeed's launcher: bash launch/run_multinode.sh TRAINER_FLAGS...
# (the flags of launch/train.py; launch/run_qwen3_vl_2b.sh calls this with the reference recipe's
# flags when HOSTFILE, NODE_RANK or NNODES is set). Two ways to start the nodes:
#
# 1. ssh/pdsh, DeepSpeed's default: run this once, on the first node. The runner starts one
#    launcher per host of the hostfile with pdsh over passwordless ssh (same paths everywhere).
#      HOSTFILE=launch/hostfile bash launch/run_multinode.sh --config my_run.yaml ...
#    = deepspeed --hostfile launch/hostfile --master_port 29500 launch/train.py --config my_run.yaml ...
#
# 2. --no_ssh, one launcher per node (SLURM, Kubernetes, anything that starts a process on each
#    node): run this on every node with its NODE_RANK (0..N-1) and node 0's address as MASTER_ADDR.
#      NODE_RANK=1 NNODES=2 MASTER_ADDR=10.0.0.1 bash launch/run_multinode.sh ...
#    = deepspeed --hostfile H --no_ssh --node_rank 1 --master_addr 10.0.0.1 --master_port 29500 launch/train.py ...
#    Under SLURM (`srun --nodes=N --ntasks-per-node=1 bash launch/run_multinode.sh ...`) NODE_RANK,
#    NNODES and MASTER_ADDR default to SLURM_NODEID, SLURM_NNODES and the job's first host. Without a
#    HOSTFILE one is written with NNODES lines of GPUS_PER_NODE slots: with --no_ssh the host names
#    are only counted, never resolved.
#
# Env: HOSTFILE (ssh path: launch/hostfile), NODE_RANK, NNODES, GPUS_PER_NODE (8), MASTER_ADDR,
#      MASTER_PORT (29500), INCLUDE / EXCLUDE (deepspeed --include / --exclude), LAUNCHER_ARGS (more
#      launcher flags, e.g. "--ssh_port 2222"), DEEPSPEED (the launcher command, default `deepspeed`),
#      DRY_RUN=1: print the command only.
# NCCL_* / GLOO_* settings (e.g. NCCL_SOCKET_IFNAME) exported here reach every rank: the --no_ssh
# launchers inherit them, the ssh path forwards NCCL_* and PYTHON* (others: a .deepspeed_env file).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/lib.sh
launcher_cmd

if [[ $# -eq 0 ]]; then
  echo "usage: [HOSTFILE=F | NODE_RANK=N NNODES=M MASTER_ADDR=A] bash launch/run_multinode.sh TRAINER_FLAGS..." >&2
  echo "       (e.g. --config launch/configs/qwen3_vl_2b_pokemon.yaml --model ... --train_data ...)" >&2
  exit 2
fi

MASTER_PORT=${MASTER_PORT:-29500}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
NNODES=${NNODES:-${SLURM_NNODES:-}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi

read -r -a select_args <<< "${LAUNCHER_ARGS:-}"
[[ -n "${INCLUDE:-}" ]] && select_args+=(--include "$INCLUDE")
[[ -n "${EXCLUDE:-}" ]] && select_args+=(--exclude "$EXCLUDE")

if [[ -n "$NODE_RANK" ]]; then
  # --no_ssh: this node's launcher only; all of them meet at MASTER_ADDR:MASTER_PORT.
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "run_multinode.sh: NODE_RANK=$NODE_RANK needs MASTER_ADDR (node 0's address, reachable from every node)" >&2
    exit 2
  fi
  if [[ -z "${HOSTFILE:-}" ]]; then
    if [[ -z "$NNODES" ]]; then
      echo "run_multinode.sh: NODE_RANK=$NODE_RANK needs HOSTFILE or NNODES (and GPUS_PER_NODE, default 8)" >&2
      exit 2
    fi
    HOSTFILE=${TMPDIR:-/tmp}/ds_vlm_hostfile_${NNODES}x${GPUS_PER_NODE}
    tmp=$HOSTFILE.$$.tmp
    for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$GPUS_PER_NODE"; done > "$tmp"
    mv -f "$tmp" "$HOSTFILE"
  fi
  run_launcher group "${LAUNCHER[@]}" --hostfile "$HOSTFILE" ${select_args[@]+"${select_args[@]}"} \
    --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py "$@"
else
  # ssh/pdsh: this one command starts every node of the hostfile.
  HOSTFILE=${HOSTFILE:-launch/hostfile}
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "run_multinode.sh: no hostfile $HOSTFILE (copy launch/hostfile.example and list your nodes)" >&2
    exit 2
  fi
  master_args=()
  [[ -n "${MASTER_ADDR:-}" ]] && master_args+=(--master_addr "$MASTER_ADDR")
  # The remote shells do not activate this virtualenv: without it the ranks miss its tools (ninja for
  # DeepSpeed's JIT ops, which then take minutes to load on some nodes and outlast --dist_timeout_s).
  if [[ -n "${VIRTUAL_ENV:-}" && " ${LAUNCHER_ARGS:-} " != *" --venv_script "* ]]; then
    master_args+=(--venv_script "$VIRTUAL_ENV/bin/activate")
  fi
  run_launcher pid "${LAUNCHER[@]}" --hostfile "$HOSTFILE" ${select_args[@]+"${select_args[@]}"} \
    ${master_args[@]+"${master_args[@]}"} --master_port "$MASTER_PORT" launch/train.py "$@"
fi
