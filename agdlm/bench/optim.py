"""`agdlm bench optim`: one optimiser step, AGD vs torch AdamW, with random gradients, in one
process, for three parameter sets:

  gpt2-124m     GPT-2-124M shapes (149 tensors): the memory-bound case
  48x64         48 layers x 64 wide, no bias (gpt2-1.5b's tensor count, 291 tensors): host-bound
  48x64-bias    the same with biases (580 tensors)

Steps are interleaved (AGD, AdamW, AGD, ...) so both see the same machine state; medians are
printed, never asserted. `ops/step` counts the top-level aten ops of one step from the torch
profiler (on a GPU each compute op is at least one kernel launch); `compute ops` leaves out
view-only ops (view, slice, detach, ...) that launch nothing. `log_metrics` is the host time
of one AGD diagnostics call (a host sync).

Bytes each step must move (the floor for a memory-bound step), N parameters of b bytes:
  AGD:          reads every grad twice (norm pass, update pass), reads each weight once and
                writes it: 4 N b; no optimiser state. The non-finite guard (zeroing a gradient
                that a skipped step would otherwise turn into NaN weights) reads and writes
                each grad once more: 6 N b in all.
  fused AdamW:  reads weight, grad, exp_avg, exp_avg_sq; writes weight, exp_avg,
                exp_avg_sq: 7 N b; state 2 N b.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from agdlm.bench.optimisers import print_optimisers
from agdlm.bench.step_timing import CASES, model_with_random_grads, sync, time_interleaved

VIEW_OPS = {"aten::view", "aten::view_as", "aten::slice", "aten::detach", "aten::alias", "aten::as_strided", "aten::select",
            "aten::unbind", "aten::_reshape_alias", "aten::reshape", "aten::expand", "aten::t", "aten::transpose",
            "aten::lift_fresh", "aten::_unsafe_view", "aten::squeeze", "aten::unsqueeze", "aten::empty",
            "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg"}

DEFAULT_CASES = ("gpt2-124m", "48x64", "48x64-bias")


def count_ops(fn) -> tuple[int, int]:
    """(top-level aten ops, of which compute ops) of one call of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    def under_aten(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    top = [e.name for e in prof.events() if e.name.startswith("aten::") and not under_aten(e)]
    return len(top), sum(1 for n in top if n not in VIEW_OPS)


def cuda_kernels(fn) -> int:
    """CUDA kernels launched by one call of fn (profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def check_no_host_sync(step) -> None:
    """One step under torch.cuda.set_sync_debug_mode("error"): any host sync raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def bench_case(name: str, shapes: dict, device, warmup: int, repeats: int, sync_check: bool = False,
               compiled: bool = False, variant: str = "none") -> dict:
    from agdlm.optim import AGD

    torch.manual_seed(0)

    def make():
        return model_with_random_grads(shapes, device)

    m_agd, m_adam = make(), make()
    agd = AGD(m_agd, variant=variant)
    try:
        adam = torch.optim.AdamW(m_adam.parameters(), lr=1e-4, fused=True)
        adam.step()
        kind = "fused"
    except (RuntimeError, TypeError):
        adam = torch.optim.AdamW(m_adam.parameters(), lr=1e-4, foreach=True)
        kind = "foreach"
    agd.step()  # the first step builds its caches (index tensors copied to the device once)
    if sync_check:
        check_no_host_sync(agd.step)
    steps = {"agd": agd.step, "adamw": adam.step}
    comp = None
    if compiled:  # AGD(compile=True) on a third copy: its first step compiles
        agd_c = AGD(make(), compile=True, variant=variant)
        sync(device)
        t0 = time.perf_counter()
        agd_c.step()
        sync(device)
        comp = dict(compile_s=time.perf_counter() - t0)
        if sync_check:
            check_no_host_sync(agd_c.step)
        steps["agd_compiled"] = agd_c.step
    med = time_interleaved(steps, device, warmup, repeats)
    if comp is not None:
        comp.update(ms=med["agd_compiled"] * 1e3, ratio=med["agd_compiled"] / med["adamw"],
                    ops=count_ops(agd_c.step)[1], kernels=cuda_kernels(agd_c.step) if device.type == "cuda" else None)
    ops, compute = count_ops(agd.step)
    adam_ops, adam_compute = count_ops(adam.step)
    t0 = time.perf_counter()
    for _ in range(3):
        agd.log_metrics()
    log_s = (time.perf_counter() - t0) / 3
    ns_ms = newton_schulz_ms(agd.step, device) if variant != "none" else None
    params = list(m_agd.parameters())
    kernels = (cuda_kernels(agd.step), cuda_kernels(adam.step)) if device.type == "cuda" else None
    return dict(case=name, kernels=kernels, compiled=comp, tensors=len(params), params=sum(p.numel() for p in params), kind=kind,
                agd_ms=med["agd"] * 1e3, adamw_ms=med["adamw"] * 1e3, ratio=med["agd"] / med["adamw"],
                ops=ops, compute_ops=compute, adamw_ops=adam_ops, adamw_compute_ops=adam_compute,
                log_metrics_ms=log_s * 1e3, bytes_per_param=next(m_agd.parameters()).element_size(), ns_ms=ns_ms)


def newton_schulz_ms(step, device) -> dict:
    """Milliseconds of one AGD step spent in Newton-Schulz (timed around each call), and of
    that the largest matrix's (the tied embedding/head at GPT-2 shapes), timed alone."""
    from agdlm.optim import agd as agd_module

    original, calls = agd_module.orthogonalise_many, []

    def timed(ms, dtype):
        sync(device)
        t0 = time.perf_counter()
        out = original(ms, dtype)
        sync(device)
        calls.append((time.perf_counter() - t0, [m for m in ms], dtype))
        return out

    agd_module.orthogonalise_many = timed
    try:
        step()
    finally:
        agd_module.orthogonalise_many = original
    biggest = max((m for _, ms, _ in calls for m in ms), key=lambda m: m.numel())
    sync(device)
    t0 = time.perf_counter()
    original([biggest], calls[0][2])
    sync(device)
    return {"total": sum(t for t, _, _ in calls) * 1e3, "largest": (time.perf_counter() - t0) * 1e3,
            "largest_shape": tuple(biggest.shape)}


SHARDED = {"single": ["parallel.backend=single"], "fsdp2": ["parallel.backend=fsdp2"],
           "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"]}


def _sharded_worker(rank: int, world: int, port: int, overrides: list[str], steps: int, out: str) -> None:
    """The AGD step inside a real backend (its binding, its all-reduce): host time of each
    `AGD.step` and of the `binding.reduce` calls in it, on every rank."""
    from agdlm.bench.ranks import cpu_backend, finish_rank, join_cpu_group

    join_cpu_group(rank, world, port)
    cfg, backend = cpu_backend(rank, world, overrides)
    opt = backend.optimizer
    # wall time of each step and of its all-reduce; and the CPU time of the rank's thread in the
    # step outside the all-reduce: the host work the binding costs, which the 2 ranks sharing
    # 2 cores (preemption, waiting for the peer) do not blur
    step_s, reduce_s, cpu_s, reduce_cpu_s = [], [], [], []
    inner_step, inner_reduce = opt.step, opt.binding.reduce

    def timed_reduce(vec):
        t0, c0 = time.perf_counter(), time.thread_time()
        out_vec = inner_reduce(vec)
        reduce_s[-1] += time.perf_counter() - t0
        reduce_cpu_s[-1] += time.thread_time() - c0
        return out_vec

    def timed_step(*args, **kwargs):
        reduce_s.append(0.0)
        reduce_cpu_s.append(0.0)
        t0, c0 = time.perf_counter(), time.thread_time()
        result = inner_step(*args, **kwargs)
        step_s.append(time.perf_counter() - t0)
        cpu_s.append(time.thread_time() - c0)
        return result

    opt.binding.reduce, opt.step = timed_reduce, timed_step
    gen = torch.Generator().manual_seed(rank)
    T, V = cfg.model.block_size, cfg.model.vocab_size
    for _ in range(steps + 2):
        data = torch.randint(0, V, (cfg.train.micro_batch_size, T + 1), generator=gen)
        backend.forward_backward(data[:, :-1].contiguous(), data[:, 1:].contiguous(), 1, True)
        backend.optimizer_step(0.0)
    keep = slice(2, None)  # the first steps build caches
    net_s = [c - r for c, r in zip(cpu_s, reduce_cpu_s)]
    finish_rank(rank, out, {"step_ms": statistics.median(step_s[keep]) * 1e3,
                            "reduce_ms": statistics.median(reduce_s[keep]) * 1e3,
                            "net_ms": statistics.median(net_s[keep]) * 1e3})


def bench_sharded(steps: int) -> None:
    """AGD's step through the FSDP2 and ZeRO-2 bindings on 2 gloo ranks against the local
    binding on 1 process, at the 48x64 tensor count (the host-bound case)."""
    from agdlm.bench.ranks import run_ranks

    shapes = ["model.n_layer=48", "model.n_head=1", "model.n_embd=64", "model.block_size=16", "model.bias=false",
              "model.vocab_size=50304", "optim.name=agd", "train.device=cpu", "train.precision=fp32",
              "train.micro_batch_size=1"]
    print(f"\nAGD step inside a backend, 48x64 (291 tensors), ms per step (medians of {steps} steps, the slowest"
          " rank; wall time, and the CPU time of the step outside its all-reduce; one thread per rank):")
    print(f"{'binding':<8} {'ranks':>5} {'step ms':>8} {'all-reduce ms':>13} {'CPU ms w/o reduce':>17} {'vs local':>8}")
    local = None
    for name, overrides in SHARDED.items():
        world = 1 if name == "single" else 2
        records = run_ranks(_sharded_worker, world, [*shapes, *overrides, f"train.global_batch_size={world}"], steps)
        step_ms = max(r["step_ms"] for r in records)
        reduce_ms = max(r["reduce_ms"] for r in records)
        net = max(r["net_ms"] for r in records)
        local = net if local is None else local
        print(f"{name:<8} {world:>5} {step_ms:>8.2f} {reduce_ms:>13.2f} {net:>17.2f} {net / local:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="agdlm bench optim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps of each optimiser (default 7)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (default 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--sync-check", action="store_true",
                    help="CUDA: run one AGD step under torch.cuda.set_sync_debug_mode('error') first (raises on any host sync)")
    ap.add_argument("--compile", action="store_true",
                    help="also time AGD(compile=True) (optim.compile: the step's scales and updates through torch.compile)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--sharded", action="store_true",
                    help="also time the AGD step through the FSDP2 and ZeRO-2 bindings on 2 gloo CPU ranks")
    ap.add_argument("--variant", default="none", help="AGD's optim.variant (none, spectral, spectral_momentum, ...)")
    ap.add_argument("--optimisers", action="store_true",
                    help="also time every optimiser agdlm offers (configs/optim/*.yaml) against fused AdamW "
                         "(agdlm.bench.optimisers), at the first case's shapes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)} (choose from {', '.join(CASES)})")
    print(f"device={device} threads={torch.get_num_threads()} repeats={args.repeats} (medians, interleaved)")
    head = (f"{'case':<11} {'tensors':>7} {'params':>12} {'AGD ms':>8} {'AdamW ms':>9} {'ratio':>6} "
            f"{'ops/step':>8} {'ops/tensor':>10} {'compute/tensor':>14} {'AdamW ops':>9} {'log_metrics ms':>14}")
    print(head)
    for name in names:
        if args.sync_check and device.type != "cuda":
            ap.error("--sync-check needs a CUDA device")
        r = bench_case(name, CASES[name], device, args.warmup, args.repeats, args.sync_check, args.compile, args.variant)
        print(f"{r['case']:<11} {r['tensors']:>7} {r['params']:>12,} {r['agd_ms']:>8.2f} {r['adamw_ms']:>9.2f} "
              f"{r['ratio']:>6.2f} {r['ops']:>8} {r['ops'] / r['tensors']:>10.2f} "
              f"{r['compute_ops'] / r['tensors']:>14.2f} {r['adamw_ops']:>9} {r['log_metrics_ms']:>14.1f}")
        if r["ns_ms"]:
            ns = r["ns_ms"]
            print(f"{'':<11} variant {args.variant}: Newton-Schulz {ns['total']:.1f} ms of the step "
                  f"({ns['total'] / r['agd_ms']:.0%}); the largest matrix {ns['largest_shape']} alone "
                  f"{ns['largest']:.1f} ms ({ns['largest'] / r['agd_ms']:.0%} of the step)")
        if r["kernels"]:
            print(f"{'':<11} CUDA kernels per step: AGD {r['kernels'][0]}, AdamW {r['kernels'][1]}"
                  + ("; no host sync in the AGD step" if args.sync_check else ""))
        c = r["compiled"]
        if c:
            print(f"{'':<11} compiled AGD: {c['ms']:.2f} ms, ratio {c['ratio']:.2f}, {c['ops']} compute ops"
                  + (f", {c['kernels']} CUDA kernels" if c["kernels"] else "")
                  + f" per step; first step (compiling) {c['compile_s']:.1f} s"
                  + ("; no host sync" if args.sync_check else ""))
    print("AdamW: torch.optim.AdamW (fused where available). ratio = AGD / AdamW step time.")
    if args.optimisers:
        print_optimisers(names[0], device, args.warmup, args.repeats)
    if args.sharded:
        bench_sharded(max(args.repeats, 15))
    return 0
