"""`agdlm bench optim`: one optimiser step, AGD vs torch AdamW, on GPT-2-124M-shaped
parameters with random gradients, in one process. Steps are interleaved (AGD, AdamW, AGD,
...) so both see the same machine state; the medians are printed, never asserted.

Bytes each step must move (the floor for a memory-bound step), N parameters of b bytes:
  AGD:          reads every grad twice (norm pass, update pass), reads each weight once and
                writes it: 4 N b; no optimiser state.
  fused AdamW:  reads weight, grad, exp_avg, exp_avg_sq; writes weight, exp_avg,
                exp_avg_sq: 7 N b; state 2 N b.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    from agdlm.model import GPT, GPTConfig
    from agdlm.optim import AGD

    ap = argparse.ArgumentParser(prog="agdlm bench optim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps of each optimiser (default 7)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (default 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=1024)

    def make():
        m = GPT(cfg).to(device)
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        return m

    m_agd, m_adam = make(), make()
    agd = AGD(m_agd)
    fused_ok = True
    try:
        adam = torch.optim.AdamW(m_adam.parameters(), lr=1e-4, fused=True)
        adam.step()
    except (RuntimeError, TypeError):
        fused_ok = False
        adam = torch.optim.AdamW(m_adam.parameters(), lr=1e-4, foreach=True)
    kind = "fused" if fused_ok else "foreach"
    n_params = sum(p.numel() for p in m_agd.parameters())
    b = next(m_agd.parameters()).element_size()

    t_agd, t_adam = [], []
    for i in range(args.warmup + args.repeats):
        for opt, times in ((agd, t_agd), (adam, t_adam)):
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    state_adam = sum(t.numel() * t.element_size() for s in adam.state.values() for t in s.values()
                     if torch.is_tensor(t) and t.dim() > 0)
    state_agd = sum(t.numel() * t.element_size() for s in agd.state.values() for t in s.values()
                    if torch.is_tensor(t))
    med_agd, med_adam = statistics.median(t_agd), statistics.median(t_adam)
    bytes_agd, bytes_adam = 4 * n_params * b, 7 * n_params * b
    print(f"device={device} threads={torch.get_num_threads()} params={n_params:,} dtype={next(m_agd.parameters()).dtype} "
          f"repeats={args.repeats}")
    print(f"AGD step (median)            {med_agd * 1e3:9.2f} ms")
    print(f"AdamW {kind:<7} step (median) {med_adam * 1e3:9.2f} ms")
    print(f"ratio AGD/AdamW              {med_agd / med_adam:9.3f}")
    print(f"optimizer state bytes        AGD {state_agd:,}   AdamW {state_adam:,}")
    print(f"bytes moved per step         AGD {bytes_agd:,}   AdamW {bytes_adam:,}   ratio {bytes_agd / bytes_adam:.3f}")
    print(f"effective bandwidth          AGD {bytes_agd / med_agd / 1e9:.2f} GB/s   AdamW {bytes_adam / med_adam / 1e9:.2f} GB/s")
    return 0
