"""`agdlm bench dist`: the same small training step on 1 and 2 CPU ranks (gloo) for every
backend, with AGD and with AdamW. Prints, per run: tokens/s, the bytes AGD all-reduces per
step (its one vector of partial sums; 0 where the reduce group has one rank, and DDP's own
gradient all-reduce is not AGD's), the optimiser-state bytes per rank (AdamW's moments,
sharded by ZeRO and FSDP2; AGD has none) and the peak RSS per rank. Figures, never asserts.

    agdlm bench dist [--steps 5] [--ranks 1,2] [--backends ddp,fsdp2,zero1,zero2,zero3]
                     [--n-layer 4] [--n-embd 128] [--block-size 128] [--batch 8]

Each (backend, optimiser, ranks) runs in fresh processes so RSS is its own; the default run
takes a few minutes on 2 cores."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from agdlm.bench.ranks import finish_rank, join_cpu_group, run_ranks
from agdlm.optim.registry import kind_of

BACKENDS = {
    "ddp": ["parallel.backend=ddp"],
    "fsdp2": ["parallel.backend=fsdp2"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
}


def _state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if hasattr(v, "to_local"):
                v = v.to_local()
            if hasattr(v, "numel") and v.dim() > 0:  # AdamW's scalar step counters are not state memory
                total += v.numel() * v.element_size()
    return total


def _worker(rank: int, world: int, port: int, overrides: list[str], steps: int, out: str) -> None:
    join_cpu_group(rank, world, port)
    import torch
    import torch.distributed as dist

    from agdlm.config import load_config
    from agdlm.model import GPT
    from agdlm.parallel import build_backend
    from agdlm.parallel.env import DistEnv
    from agdlm.train import make_optimizer_factory

    cfg = load_config(None, overrides)
    env = DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    backend = build_backend(cfg, env)
    backend.setup(model, make_optimizer_factory(cfg, "cpu"))
    opt = backend.optimizer
    reduced = []
    if hasattr(opt, "binding"):
        inner = opt.binding.reduce
        group = getattr(opt.binding, "group", None)

        def counting_reduce(vec):
            if group is not None and dist.get_world_size(group) > 1:
                reduced.append(vec.numel() * vec.element_size())
            return inner(vec)

        opt.binding.reduce = counting_reduce
    rows = cfg.train.global_batch_size // world
    gen = torch.Generator().manual_seed(rank)
    T, V = cfg.model.block_size, cfg.model.vocab_size

    def step():
        data = torch.randint(0, V, (rows, T + 1), generator=gen)
        x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        micro = list(zip(x.split(cfg.train.micro_batch_size), y.split(cfg.train.micro_batch_size)))
        for i, (xb, yb) in enumerate(micro):
            backend.forward_backward(xb, yb, len(micro), i == len(micro) - 1)
        backend.optimizer_step(kind_of(cfg.optim.name).grad_clip(cfg.optim))

    step()  # warm-up (allocations, DeepSpeed buffers)
    reduced.clear()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    record = {
        "rank": rank,
        "tokens_per_s": steps * cfg.train.global_batch_size * T / elapsed,
        "agd_reduce_bytes_per_step": sum(reduced) / steps if hasattr(opt, "binding") else None,
        "opt_state_bytes": _state_bytes(opt),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    finish_rank(rank, out, record)


def run_one(overrides: list[str], world: int, steps: int) -> list[dict]:
    return run_ranks(_worker, world, overrides, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agdlm bench dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ranks = [int(r) for r in args.ranks.split(",")]
    model = [f"model.n_layer={args.n_layer}", f"model.n_head={max(1, args.n_embd // 32)}", f"model.n_embd={args.n_embd}",
             f"model.block_size={args.block_size}", "model.bias=true", "train.device=cpu", "train.precision=fp32",
             f"train.global_batch_size={args.batch}"]
    print(f"GPT {args.n_layer}x{args.n_embd}, T={args.block_size}, vocab 50304, tied, biases; global batch "
          f"{args.batch} x {args.block_size} tokens; {args.steps} timed steps after one warm-up; CPU, gloo, fp32")
    head = f"{'backend':<7} {'ranks':>5} {'optim':<6} {'tokens/s':>9} {'AGD all-reduce B/step':>22} " \
           f"{'opt state B/rank':>17} {'peak RSS MiB/rank':>18}"
    print(head)
    print("-" * len(head))
    for name in args.backends.split(","):
        for world in ranks:
            for optim in ("agd", "adamw"):
                overrides = [*model, *BACKENDS[name], f"optim.name={optim}",
                             f"train.micro_batch_size={args.batch // world}"]
                try:
                    recs = run_one(overrides, world, args.steps)
                except Exception as e:  # report and go on with the other backends
                    print(f"{name:<7} {world:>5} {optim:<6} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    continue
                agd_bytes = recs[0]["agd_reduce_bytes_per_step"]
                state = max(r["opt_state_bytes"] for r in recs)
                rss = max(r["peak_rss_mib"] for r in recs)
                print(f"{name:<7} {world:>5} {optim:<6} {recs[0]['tokens_per_s']:>9,.0f} "
                      f"{'-' if agd_bytes is None else f'{agd_bytes:,.0f}':>22} {state:>17,} {rss:>18,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
