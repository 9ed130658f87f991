"""`agdlm bench NAME [args]`: run the benchmark module agdlm.bench.NAME."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "optim": "one optimiser step: AGD vs torch AdamW on GPT-2-124M-shaped parameters",
    "data": "tokenizer, streaming loader and pre-tokenised loader throughput",
    "dist": "1 and 2 CPU ranks per backend: tokens/s, AGD all-reduce bytes, optimiser state, RSS",
    "spectral": "AGD's spectral variants on FSDP2/ZeRO ranks: bytes sent per rank, Newton-Schulz CPU time per rank",
    "memory": "start-up time and per-rank peak RSS: 1 process vs 2 ranks on FSDP2 and ZeRO-3, a wide model",
    "manifest": "checkpoint manifests: write and verify seconds per GB at the memory benchmark's model",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: agdlm bench {" + ",".join(BENCHMARKS) + "} [args]")
        for name, text in BENCHMARKS.items():
            print(f"  {name:<8} {text}")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return int(importlib.import_module(f"agdlm.bench.{argv[0]}").main(argv[1:]) or 0)
