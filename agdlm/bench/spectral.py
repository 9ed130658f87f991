"""`agdlm bench spectral`: AGD's spectral variants on sharded backends, 1, 2 and 4 gloo CPU
ranks: what each rank sends per step and how much Newton-Schulz each rank runs.

Per rank, medians over the timed steps:
- bytes sent: the payload of every all_to_all_single (less what a rank keeps for itself)
  and all_reduce it issues in the optimiser step, counted at the call; an all-reduce's ring
  traffic is 2(N-1)/N of its payload, which is what the table counts for it;
- the ideal for the owner exchange: 2(N-1)/N^2 of the spectral matrices' elements;
- CPU seconds in Newton-Schulz on this rank (every call timed) and the whole step's;
  against one process (1 rank) running the same model.

Printed, never asserted. Run it on an otherwise idle machine."""

from __future__ import annotations

import argparse
import statistics
import time

MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "model.vocab_size=2048",
         "model.bias=false", "train.device=cpu", "train.precision=fp32", "train.micro_batch_size=1", "optim.name=agd"]
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
            "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def _worker(rank: int, world: int, port: int, overrides: list[str], steps: int, out: str) -> None:
    from agdlm.bench.ranks import cpu_backend, finish_rank, join_cpu_group

    join_cpu_group(rank, world, port)
    import torch
    import torch.distributed as dist

    from agdlm.optim import agd as agd_module

    cfg, backend = cpu_backend(rank, world, overrides)
    counted = {"sent": 0, "ns_s": 0.0}
    # the Newton-Schulz entry point: orthogonalise_many, or (before it existed) orthogonalise
    ns_name = "orthogonalise_many" if hasattr(agd_module, "orthogonalise_many") else "orthogonalise"
    original_a2a, original_ar, original_ns = dist.all_to_all_single, dist.all_reduce, getattr(agd_module, ns_name)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        me = dist.get_rank(group)
        kept = input_split_sizes[me] if input_split_sizes else input.numel() // dist.get_world_size(group)
        counted["sent"] += (input.numel() - kept) * input.element_size()
        return original_a2a(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def all_reduce(tensor, *args, **kw):
        n = dist.get_world_size(kw.get("group"))
        counted["sent"] += 2 * (n - 1) / n * tensor.numel() * tensor.element_size()  # ring
        return original_ar(tensor, *args, **kw)

    def timed_ns(*a):
        t0 = time.process_time()
        result = original_ns(*a)
        counted["ns_s"] += time.process_time() - t0
        return result

    def patch(a2a, ar, ns):
        dist.all_to_all_single, dist.all_reduce = a2a, ar
        setattr(agd_module, ns_name, ns)

    gen = torch.Generator().manual_seed(rank)
    T, V = cfg.model.block_size, cfg.model.vocab_size
    sent, ns, step_cpu = [], [], []
    for k in range(steps + 2):
        data = torch.randint(0, V, (1, T + 1), generator=gen)
        backend.forward_backward(data[:, :-1].contiguous(), data[:, 1:].contiguous(), 1, True)
        counted.update(sent=0, ns_s=0.0)
        patch(all_to_all_single, all_reduce, timed_ns)
        t0 = time.process_time()
        backend.optimizer_step(0.0)
        cpu = time.process_time() - t0
        patch(original_a2a, original_ar, original_ns)
        if k >= 2:  # the first steps build caches and exchange the layout
            sent.append(counted["sent"])
            ns.append(counted["ns_s"])
            step_cpu.append(cpu)
    opt = backend.optimizer
    spectral_elems = sum(opt.segments[si]["stop"] - opt.segments[si]["start"] for si in opt._spectral_segments)
    finish_rank(rank, out, {"sent": statistics.median(sent), "ns_ms": statistics.median(ns) * 1e3,
                            "step_cpu_ms": statistics.median(step_cpu) * 1e3, "spectral_elems": spectral_elems})


def main(argv: list[str] | None = None) -> int:
    from agdlm.bench.ranks import run_ranks

    ap = argparse.ArgumentParser(prog="agdlm bench spectral", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="spectral_momentum")
    ap.add_argument("--backends", default="fsdp2,zero3", help=f"comma-separated, of: {', '.join(BACKENDS)}")
    ap.add_argument("--ranks", default="2,4", help="comma-separated rank counts (1 process is always the reference)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[], help="extra section.key=value overrides (the model)")
    args = ap.parse_args(argv)
    model = [*MODEL, f"optim.variant={args.variant}", *args.set]
    one = run_ranks(_worker, 1, [*model, "parallel.backend=single", "train.global_batch_size=1"], args.steps)[0]
    print(f"AGD variant {args.variant}, {one['spectral_elems']:,} elements in spectral matrices; medians of "
          f"{args.steps} steps; one rank per process, 1 thread each")
    print(f"one process: Newton-Schulz {one['ns_ms']:.1f} ms CPU, step {one['step_cpu_ms']:.1f} ms CPU")
    print(f"{'backend':<7} {'ranks':>5} {'MB sent/rank':>12} {'ideal MB':>9} {'NS ms (max rank)':>16} "
          f"{'vs 1 process':>12} {'step CPU ms':>11}")
    for name in args.backends.split(","):
        for world in (int(n) for n in args.ranks.split(",")):
            recs = run_ranks(_worker, world, [*model, *BACKENDS[name], f"train.global_batch_size={world}"], args.steps)
            sent = max(r["sent"] for r in recs)
            ideal = 2 * (world - 1) / world**2 * one["spectral_elems"] * 4
            ns = max(r["ns_ms"] for r in recs)
            print(f"{name:<7} {world:>5} {sent / 1e6:>12.3f} {ideal / 1e6:>9.3f} {ns:>16.1f} {ns / one['ns_ms']:>12.2f} "
                  f"{max(r['step_cpu_ms'] for r in recs):>11.1f}")
    print("MB sent: all-to-all payloads less each rank's own part, plus the all-reduce's ring traffic "
          "2(N-1)/N of its payload. ideal: the owner exchange's 2(N-1)/N^2 of the spectral elements (fp32).")
    return 0
