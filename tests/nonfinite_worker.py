"""Worker for tests/test_agd_nonfinite_dist.py: one 2-rank gloo group. For each backend, one
good AGD step, then a step whose backward puts an inf into ONE rank's gradient (a hook on
rank 0's final LayerNorm output, so the real reduce spreads it): every rank must leave its
weights bitwise unchanged, count the skip, and move again on the next good step."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import TINY, build, initial_weights, train_step  # noqa: E402

from agdlm.config import load_config  # noqa: E402
from agdlm.parallel.env import DistEnv, exit_without_teardown, free_port  # noqa: E402

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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    results = {}
    for name, overrides in CASES.items():
        mine = run_case(overrides, env)
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, mine)
        results[name] = gathered
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown(0)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(2, free_port(), sys.argv[1]), nprocs=2, join=True)
