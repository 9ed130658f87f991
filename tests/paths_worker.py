"""Worker for tests/test_dist_paths.py: the sharded paths real GPU runs take but the 2-rank
fp32 cases of dist_worker.py never reach, against the single-process reference: 3 ranks
with odd dimensions (n_embd 48, 3 heads, a vocabulary that is not a multiple of the world
size, so FSDP2 shards are uneven), a zero-row FSDP2 shard (a 2-row position table on 3
ranks), ZeRO-3 with parameters above DeepSpeed's persistence threshold (partitioned, with
padding), bf16 (FSDP2 MixedPrecisionPolicy; DeepSpeed bf16 with ZeRO-1's BF16_Optimizer and
ZeRO-2), and HSDP 2 x 2 on 4 ranks.

    python tests/paths_worker.py OUT.json WORLD_SIZE [case ...]
"""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker  # noqa: E402
from gloo_workers import join_group, run_cases, spawn  # noqa: E402

ODD = ["model.n_embd=48", "model.n_head=3", "model.vocab_size=101"]
BIG_VOCAB = ["model.n_embd=48", "model.n_head=3", "model.vocab_size=4099"]  # wte 196,752 > 1e5: partitioned
BF16 = ["train.precision=bf16"]

CASES = {
    3: {
        "fsdp2-agd-odd": ["parallel.backend=fsdp2", "optim.name=agd", *ODD],
        "fsdp2-adamw-odd": ["parallel.backend=fsdp2", "optim.name=adamw", *ODD],
        "fsdp2-agd-modular-untied-odd": ["parallel.backend=fsdp2", "optim.name=agd", "optim.policy=modular",
                                         "model.tie_embeddings=false", *ODD],
        "fsdp2-agd-zero-row-shard": ["parallel.backend=fsdp2", "optim.name=agd", "model.block_size=2"],
        "zero2-agd-odd": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=agd", *ODD],
        "zero3-agd-partitioned": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd", *BIG_VOCAB],
        "zero3-adamw-partitioned": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=adamw",
                                    *BIG_VOCAB],
        "fsdp2-agd-spectral_momentum-odd": ["parallel.backend=fsdp2", "optim.name=agd",
                                            "optim.variant=spectral_momentum", *ODD],
        "zero3-agd-momentum-partitioned": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "optim.name=agd",
                                           "optim.variant=momentum", *BIG_VOCAB],
        "fsdp2-agd-bf16": ["parallel.backend=fsdp2", "optim.name=agd", *ODD, *BF16],
        "zero1-agd-bf16": ["parallel.backend=deepspeed", "parallel.zero_stage=1", "optim.name=agd", *ODD, *BF16],
        "zero2-agd-bf16": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=agd", *ODD, *BF16],
        "zero1-agd-momentum-bf16": ["parallel.backend=deepspeed", "parallel.zero_stage=1", "optim.name=agd",
                                    "optim.variant=momentum", *ODD, *BF16],
    },
    4: {
        "hsdp2x2-agd": ["parallel.backend=fsdp2", "parallel.replicate=2", "optim.name=agd", *ODD],
        "hsdp2x2-agd-spectral": ["parallel.backend=fsdp2", "parallel.replicate=2", "optim.name=agd",
                                 "optim.variant=spectral", *ODD],
    },
}


def worker(rank: int, world_size: int, port: int, out: str, only: list[str] | None) -> None:
    env = join_group(rank, world_size, port)
    # every rank takes 2 micro-batches of 2 rows: the global batch grows with the world size
    dist_worker.ROWS = 4 * world_size
    dist_worker.TINY = [o for o in dist_worker.TINY if not o.startswith("train.global_batch_size")] + [
        f"train.global_batch_size={dist_worker.ROWS}"]
    tmp = Path(out).parent / f"ckpt{world_size}"
    cases = {name: o for name, o in CASES[world_size].items() if not only or name in only}
    run_cases(env, out, cases, lambda name, overrides: dist_worker.run_case(name, overrides, env, tmp))


if __name__ == "__main__":
    spawn(worker, int(sys.argv[2]), sys.argv[1], sys.argv[3:] or None)
