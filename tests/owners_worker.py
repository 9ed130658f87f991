"""Worker for tests/test_owner_exchange.py: one 3-rank gloo group.

- `exchange`: agdlm.parallel.owners.OwnerExchange on regions cut into uneven pieces (a piece
  crossing what would be a row, a rank holding nothing of a region, one region in several
  pieces on one rank); the function doubles each region and adds its job's sum, so a result
  needs the WHOLE region (a partial one gives another sum). Each rank checks its own
  elements against the function applied to the whole regions, computed on every rank
  from the same seed.
- `missing`: a rank leaves out one of its pieces: the owner must refuse the layout.
- AGD variant spectral / spectral_momentum on FSDP2 over 3 ranks with odd dimensions (n_embd
  15, 3 heads: 45 x 15 c_attn, vocab 67) and a zero-row shard (block_size 2: wpe's 2 rows
  over 3 ranks), against one process, through tests/dist_worker.py's case runner."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker  # noqa: E402
from gloo_workers import join_group, run_cases, spawn  # noqa: E402

from agdlm.parallel.owners import OwnerExchange  # noqa: E402

REGIONS = [7, 12, 5, 9, 3]
JOBS = [[0, 1], [2], [3, 4]]


def layout(rank: int, world: int) -> list[tuple[int, int, int]]:
    """Uneven cuts: region r is split at fixed points, pieces dealt to ranks round-robin from r."""
    pieces = []
    for r, size in enumerate(REGIONS):
        cuts = sorted({0, size, *(c for c in (1, size // 2, size - 2) if 0 < c < size)})
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
            if (r + k) % world == rank:
                pieces.append((r, a, b - a))
    return pieces


def reference(regions: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    return {j: [2 * regions[r] + sum(float(regions[q].sum()) for q in JOBS[j]) for r in JOBS[j]] for j in range(len(JOBS))}


def run_exchange(env, drop_one: bool = False) -> dict:
    gen = torch.Generator().manual_seed(0)
    regions = [torch.randn(n, generator=gen) for n in REGIONS]
    mine = layout(env.rank, env.world_size)
    if drop_one and env.rank == 1:
        mine = mine[1:]
    try:
        ex = OwnerExchange(None, REGIONS, JOBS, costs=[12.0, 5.0, 9.0], local_pieces=mine)
    except RuntimeError as e:
        return {"refused": str(e)}
    values = [regions[r][a : a + n].clone() for r, a, n in mine]
    applied: list[int] = []

    def fn(owned):
        applied.extend(owned)
        return {j: [2 * reg + sum(float(x.sum()) for x in regs) for reg in regs] for j, regs in ((j, owned[j]) for j in owned)}

    out = ex.run(values, fn, torch.float32, torch.device("cpu"))
    want = reference(regions)
    flat = {r: want[j][i] for j, rs in enumerate(JOBS) for i, r in enumerate(rs)}
    err = max(float((o - flat[r][a : a + n]).abs().max()) for o, (r, a, n) in zip(out, mine))
    gathered: list = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, (err, applied, ex.owners, ex.bytes_sent))
    return {"max_err": max(g[0] for g in gathered), "applied": [g[1] for g in gathered], "owners": gathered[0][2],
            "bytes_sent": [g[3] for g in gathered]}


AGD_3RANK = ["model.n_embd=15", "model.n_head=3", "model.vocab_size=67", "model.block_size=2",
             "train.global_batch_size=6", "train.micro_batch_size=2", "parallel.backend=fsdp2", "optim.name=agd"]
CASES = {
    "exchange": None,
    "missing": None,
    "fsdp2-3rank-agd-spectral": [*AGD_3RANK, "optim.variant=spectral"],
    "fsdp2-3rank-agd-spectral_momentum": [*AGD_3RANK, "optim.variant=spectral_momentum"],
}


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    env = join_group(rank, world_size, port)
    dist_worker.ROWS = 6  # 2 rows per rank
    tmp = Path(out).parent / "ckpt"

    def run_one(name, overrides):
        if name == "exchange":
            return run_exchange(env)
        if name == "missing":
            return run_exchange(env, drop_one=True)
        return dist_worker.run_case(name, overrides, env, tmp)

    run_cases(env, out, CASES, run_one)


if __name__ == "__main__":
    spawn(worker, 3, sys.argv[1])
