"""`agdlm bench memory`: what start-up and one training step cost each rank, for a model wide
enough that weights dominate. Per case (backend x ranks x micro-batches): start-up time
(model built, initialised and wrapped, optimiser bound) and time to the end of the first
step; peak host RSS per rank net of the imports (the worst rank), after start-up and after
the steps; and that peak as a ratio to the one-process run with the same micro-batches.
Figures, never asserts.

    agdlm bench memory [--n-layer 8] [--n-embd 1024] [--block-size 64] [--steps 2]
                       [--optim agd] [--accum 1,4] [--cases single,fsdp2,zero3]

Each case runs in fresh processes (torch.multiprocessing spawn, gloo, CPU, fp32), so each
RSS is its own. The workers run with glibc's mmap threshold fixed at 1 MiB
(MALLOC_MMAP_THRESHOLD_), so a freed tensor's pages go back to the system and RSS follows the
tensors alive, as GPU memory does under a caching allocator; glibc's default raises the
threshold as large blocks are freed and keeps later ones in its heap (on the 8x1024 model
that adds ~0.35-1 GB to a sharded rank's RSS). `--glibc-heap` measures with the default.
The model starts the way `agdlm train` starts a fresh run (agdlm.train.build_model_and_backend)."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

from agdlm.bench.ranks import finish_rank, join_cpu_group, run_ranks

CASES = {  # name -> (ranks, overrides)
    "single": (1, ["parallel.backend=single"]),
    "fsdp2": (2, ["parallel.backend=fsdp2"]),
    "zero3": (2, ["parallel.backend=deepspeed", "parallel.zero_stage=3"]),
}


def rss_mib() -> float:
    """Resident set size now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(rank: int, world: int, port: int, overrides: list[str], steps: int, out: str) -> None:
    join_cpu_group(rank, world, port)
    import torch
    import torch.distributed as dist

    import deepspeed  # noqa: F401 - imported by every case, so the baseline is the same
    from agdlm.config import load_config
    from agdlm.parallel.env import DistEnv
    from agdlm.train import build_model_and_backend

    cfg = load_config(None, overrides)
    env = DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    dist.barrier()
    baseline = rss_mib()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    backend = build_model_and_backend(cfg, env, fresh=True)
    dist.barrier()
    startup_s = time.perf_counter() - t0
    startup_peak = peak_rss_mib() - baseline
    T, V, micro = cfg.model.block_size, cfg.model.vocab_size, cfg.train.micro_batch_size
    accum = cfg.grad_accum_steps(world)
    gen = torch.Generator().manual_seed(rank)
    first_step_s = None
    for _ in range(steps):
        for i in range(accum):
            data = torch.randint(0, V, (micro, T + 1), generator=gen)
            backend.forward_backward(data[:, :-1], data[:, 1:], accum, i == accum - 1)
        backend.optimizer_step(0.0)
        if first_step_s is None:
            dist.barrier()
            first_step_s = time.perf_counter() - t0
    record = {"startup_s": startup_s, "first_step_s": first_step_s, "startup_peak_mib": startup_peak,
              "peak_mib": peak_rss_mib() - baseline, "baseline_mib": baseline}
    finish_rank(rank, out, record)


def run_case(overrides: list[str], world: int, steps: int) -> list[dict]:
    return run_ranks(_worker, world, overrides, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agdlm bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--optim", default="agd", choices=("agd", "adamw"))
    parser.add_argument("--accum", default="1,4", help="micro-batches per rank per step (micro batch 1)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--glibc-heap", action="store_true", help="glibc's default (dynamic) mmap threshold")
    parser.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="extra overrides")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.glibc_heap:  # read by glibc when each spawned worker starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    model = [f"model.n_layer={args.n_layer}", f"model.n_head={max(1, args.n_embd // 64)}", f"model.n_embd={args.n_embd}",
             f"model.block_size={args.block_size}", "model.bias=true", "train.device=cpu", "train.precision=fp32",
             f"optim.name={args.optim}", "train.micro_batch_size=1", *args.set]
    print(f"GPT {args.n_layer}x{args.n_embd}, T={args.block_size}, vocab 50304, tied, biases; {args.optim}; micro batch 1; "
          f"{args.steps} steps; CPU, gloo, fp32. RSS net of imports, worst rank; ratio = peak / 1-process peak; "
          f"{'glibc default heap' if args.glibc_heap else 'mmap threshold 1 MiB'}")
    head = (f"{'case':<7} {'ranks':>5} {'accum':>5} {'start-up s':>10} {'1st step s':>10} {'start-up MiB':>12} "
            f"{'peak MiB':>9} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for accum in [int(a) for a in args.accum.split(",")]:
        single_peak = None
        for name in args.cases.split(","):
            world, backend = CASES[name]
            overrides = [*model, *backend, f"train.global_batch_size={world * accum}"]
            try:
                recs = run_case(overrides, world, args.steps)
            except Exception as e:  # report and go on with the other cases
                print(f"{name:<7} {world:>5} {accum:>5} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            peak = max(r["peak_mib"] for r in recs)
            single_peak = peak if name == "single" else single_peak
            ratio = f"{peak / single_peak:.2f}" if single_peak else "-"
            print(f"{name:<7} {world:>5} {accum:>5} {max(r['startup_s'] for r in recs):>10.2f} "
                  f"{max(r['first_step_s'] for r in recs):>10.2f} {max(r['startup_peak_mib'] for r in recs):>12,.0f} "
                  f"{peak:>9,.0f} {ratio:>6}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
