#!/usr/bin/env bash
# `agdlm train` on parallel.backend=deepspeed through DeepSpeed's own launcher and a
# hostfile (one line per node: `hostname slots=GPUS`; see hostfile.example). The launcher
# reaches the other nodes by passwordless ssh (pdsh if installed) and starts one process
# per slot with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR set, which agdlm reads.
#
#   launch/deepspeed.sh HOSTFILE [--master-addr HOST] [--master-port PORT] [--num-gpus G]
#                       -- [CONFIG.yaml ...] [section.key=value ...]
#
# HOSTFILE `local` runs on this node only, without ssh (DeepSpeed refuses a hostfile whose
# hosts it cannot ssh to, localhost included).
#
# The ZeRO config is generated from ours (parallel.zero_stage, train.*, optim.*); the JSON
# files in launch/ show exactly what is generated.
set -euo pipefail
HOSTFILE=${1:?usage: launch/deepspeed.sh HOSTFILE [options] -- [agdlm train args]}
shift
if [[ "$HOSTFILE" == "local" ]]; then
  HOSTS=()
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
else
  HOSTS=(--hostfile "$HOSTFILE")
  MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
fi
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --master-addr) MASTER_ADDR=$2; shift 2 ;;
    --master-port) MASTER_PORT=$2; shift 2 ;;
    --num-gpus) EXTRA+=(--num_gpus "$2"); shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed "${HOSTS[@]}" --no_local_rank --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${EXTRA[@]}" \
  --module agdlm train parallel.backend=deepspeed "$@"
