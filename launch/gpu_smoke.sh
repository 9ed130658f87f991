#!/usr/bin/env bash
# Run this first on a GPU node: nccl, bf16, compile on, AGD on FSDP2 and on DeepSpeed
# ZeRO 1/2/3, a few steps each (GPT-2-124M shape on the built-in demo corpus, no
# download); prints tokens/s, MFU and peak memory per backend, and fails loudly. First, one
# AGD step at GPT-2-124M and 1.5B shapes under torch.cuda.set_sync_debug_mode("error") (any host
# sync raises), with its CUDA kernel count and time against fused AdamW, eager and with
# optim.compile (the step's scales and updates through torch.compile). Then (GPU only) the
# recommended AGD's cost on one GPU: its Newton-Schulz share (bench optim --variant), and
# tokens/s of AdamW, the faithful AGD, spectral_momentum and spectral_momentum_rows at
# micro-batch 16 x 1,024 without accumulation and at nanoGPT's ~0.5M tokens per step.
#
#   launch/gpu_smoke.sh                 # all GPUs of this node
#   NPROC=2 STEPS=10 launch/gpu_smoke.sh
#   SMOKE_CPU=1 launch/gpu_smoke.sh     # the same flow on CPU (gloo, fp32, tiny model)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t agdlm_smoke_XXXX)}
STEPS=${STEPS:-20}
if [[ "${SMOKE_CPU:-0}" == "1" ]]; then
  NPROC=${NPROC:-2}
  MODEL=(model.n_layer=2 model.n_head=2 model.n_embd=64 model.block_size=64)
  RUNTIME=(train.device=cpu train.precision=fp32 train.compile=false train.micro_batch_size=4)
else
  NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
  [[ "$NPROC" -ge 1 ]] || { echo "gpu_smoke: no CUDA device visible" >&2; exit 2; }
  "$PYTHON" -c 'import torch, torch.distributed as d; assert d.is_nccl_available(), "no nccl"; assert torch.cuda.is_bf16_supported(), "no bf16"; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), torch.cuda.get_device_name())'
  MODEL=(model.n_layer=12 model.n_head=12 model.n_embd=768 model.block_size=1024)
  RUNTIME=(train.device=cuda train.precision=bf16 train.compile=true train.micro_batch_size=8)
fi
MICRO=$(printf '%s\n' "${RUNTIME[@]}" | sed -n 's/train.micro_batch_size=//p')
COMMON=("${MODEL[@]}" "${RUNTIME[@]}" data.source=demo optim.name=agd "train.global_batch_size=$((MICRO * NPROC))"
        "train.max_steps=$STEPS" log.interval=5 train.eval_interval=100000 train.eval_batches=1
        train.ckpt_interval=100000 "train.out_dir=$OUT")

declare -a NAMES=()
run() {  # name, overrides...
  local name=$1; shift
  echo "=== $name ($NPROC ranks) ==="
  "$HERE/torchrun.sh" --nproc-per-node "$NPROC" -- "${COMMON[@]}" "train.run_name=$name" "$@"
  NAMES+=("$name")
}
if [[ "${SMOKE_CPU:-0}" != "1" ]]; then
  echo "=== AGD step at GPT-2-124M and 1.5B shapes, eager and compiled: no host sync, kernels, time vs fused AdamW ==="
  "$PYTHON" -m agdlm bench optim --cases gpt2-124m,gpt2-1.5b --sync-check --compile --repeats 5
fi
if [[ "${SMOKE_CPU:-0}" != "1" ]]; then
  for v in spectral_momentum spectral_momentum_rows; do
    echo "=== AGD variant $v: step time, Newton-Schulz share (bf16, stacked by shape) ==="
    "$PYTHON" -m agdlm bench optim --cases gpt2-124m --variant "$v" --compile --repeats 5
  done
  SPEED_STEPS=${SPEED_STEPS:-12}
  for opt in adamw agd spectral_momentum spectral_momentum_rows; do
    case $opt in
      adamw) O=(optim.name=adamw optim.warmup_steps=2) ;;
      agd) O=(optim.name=agd optim.compile=true) ;;
      *) O=(optim.name=agd optim.compile=true "optim.variant=$opt") ;;
    esac
    for batch in 16 512; do  # no accumulation; 32 micro-batches of 16 x 1,024 (524,288 tokens a step)
      steps=$([[ $batch == 16 ]] && echo $((SPEED_STEPS * 4)) || echo "$SPEED_STEPS")
      echo "=== speed: $opt, global batch $batch (1 GPU) ==="
      "$HERE/torchrun.sh" --nproc-per-node 1 -- "${COMMON[@]}" parallel.backend=single train.micro_batch_size=16 \
        "train.global_batch_size=$batch" "train.max_steps=$steps" log.interval=2 "${O[@]}" "train.run_name=speed-$opt-b$batch"
      NAMES+=("speed-$opt-b$batch")
    done
  done
fi
run fsdp2 parallel.backend=fsdp2
run zero1 parallel.backend=deepspeed parallel.zero_stage=1
run zero2 parallel.backend=deepspeed parallel.zero_stage=2
run zero3 parallel.backend=deepspeed parallel.zero_stage=3

"$PYTHON" - "$OUT" "${NAMES[@]}" <<'PY'
import json, math, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
print(f"\n{'backend':<8} {'tokens/s':>12} {'MFU':>7} {'peak mem GiB':>13} {'final loss':>11} {'agd_eta':>8}")
ok = True
for name in names:
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    last = train[-1]
    mem = last.get("mem_peak_gib", last.get("mem_rss_gib", float("nan")))
    mfu = last.get("mfu", float("nan")) * 100
    ok &= math.isfinite(last["train_loss"]) and train[-1]["train_loss"] < train[0]["train_loss"]
    print(f"{name:<8} {last['tokens_per_s']:>12,.0f} {mfu:>6.1f}% {mem:>13.2f} {last['train_loss']:>11.4f} {last.get('agd_eta', float('nan')):>8.4f}")
print(f"\nrun directories: {out}")
sys.exit(0 if ok else "gpu_smoke: a loss did not go down or is not finite")
PY
