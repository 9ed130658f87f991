#!/usr/bin/env bash
# One torchrun agent per node running `agdlm train`. Same command on every node; only
# --node-rank differs. Arguments after `--` (or the first non-option) go to `agdlm train`.
#
#   launch/torchrun.sh [--nnodes N] [--node-rank R] [--nproc-per-node P]
#                      [--rdzv-endpoint HOST:PORT] [--rdzv-id ID] [--max-restarts K]
#                      -- [CONFIG.yaml ...] [section.key=value ...]
#
# Each option can also come from the environment: NNODES, NODE_RANK, NPROC_PER_NODE,
# RDZV_ENDPOINT, RDZV_ID, MAX_RESTARTS. One node without an endpoint runs --standalone.
# With --max-restarts K, torchrun restarts every worker after a failure (up to K times);
# the trainer resumes from checkpoints/latest of the run directory by itself.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
RDZV_ID=${RDZV_ID:-agdlm}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank|--node_rank) NODE_RANK=$2; shift 2 ;;
    --nproc-per-node|--nproc_per_node) NPROC_PER_NODE=$2; shift 2 ;;
    --rdzv-endpoint|--rdzv_endpoint) RDZV_ENDPOINT=$2; shift 2 ;;
    --rdzv-id|--rdzv_id) RDZV_ID=$2; shift 2 ;;
    --max-restarts|--max_restarts) MAX_RESTARTS=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ -z "$NPROC_PER_NODE" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi

if [[ "$NNODES" == "1" && -z "$RDZV_ENDPOINT" ]]; then
  RDZV=(--standalone)
else
  [[ -n "$RDZV_ENDPOINT" ]] || { echo "launch/torchrun.sh: --rdzv-endpoint HOST:PORT is required with --nnodes $NNODES" >&2; exit 2; }
  RDZV=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=$RDZV_ID")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE" \
  "${RDZV[@]}" --max-restarts="$MAX_RESTARTS" \
  -m agdlm train "$@"
