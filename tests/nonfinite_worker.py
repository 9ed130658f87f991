"""Worker for tests/test_agd_nonfinite_dist.py: one 2-rank gloo group. For each backend, one
good AGD step, then a step whose backward puts an inf into ONE rank's gradient (a hook on
rank 0's final LayerNorm output, so the real reduce spreads it): every rank must leave its
weights bitwise unchanged, count the skip, and move again on the next good step."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import TINY, build, initial_weights, train_step  # noqa: E402

from agdlm.config import load_config  # noqa: E402
from agdlm.parallel.env import DistEnv  # noqa: E402
from gloo_workers import join_group, run_cases, spawn  # noqa: E402

CASES = {
    "ddp": ["parallel.backend=ddp"],
    "fsdp2": ["parallel.backend=fsdp2"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
}


def local_weights(opt) -> list[torch.Tensor]:
    return [w.detach().clone() for i in range(len(opt.params)) for _, w, _ in opt.binding.pieces(i)]


def run_case(overrides: list[str], env: DistEnv) -> dict:
    cfg = load_config(None, [*TINY, *overrides, "optim.name=agd"])
    backend = build(cfg, env, initial_weights(cfg))
    inject = {"on": False}

    def poison(module, inputs, output):
        if inject["on"] and env.rank == 0 and output.requires_grad:
            output.register_hook(lambda g: g.index_put((torch.tensor([0]),), torch.tensor(float("inf"))))

    backend.raw_model.transformer.ln_f.register_forward_hook(poison)
    opt = backend.optimizer
    train_step(backend, cfg, env, 0)
    before = local_weights(opt)
    inject["on"] = True
    train_step(backend, cfg, env, 1)
    inject["on"] = False
    after = local_weights(opt)
    unchanged = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    skips_after_bad = int(opt.consecutive_skips)
    train_step(backend, cfg, env, 2)
    moved = any(not torch.equal(a, b) for a, b in zip(after, local_weights(opt)))
    finite = all(bool(torch.isfinite(w).all()) for w in local_weights(opt))
    engine = getattr(backend, "engine", None)
    return {"rank": env.rank, "engine_skipped": getattr(engine, "skipped_steps", None), "pieces": len(before), "unchanged": unchanged, "skips_after_bad": skips_after_bad,
            "skipped_total": int(opt.skipped_steps), "moved_after_good": moved, "finite": finite,
            "skips_after_good": int(opt.consecutive_skips)}


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    env = join_group(rank, world_size, port)

    def every_rank(name: str, overrides: list[str]) -> list[dict]:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, run_case(overrides, env))
        return gathered

    run_cases(env, out, CASES, every_rank)


if __name__ == "__main__":
    spawn(worker, 2, sys.argv[1])
