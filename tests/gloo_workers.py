"""What every multi-process test shares: a worker script joins a real gloo group, runs its
named cases (each a collective on every rank), and rank 0 writes the results as JSON; the
pytest side runs that script in a subprocess and reads the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist

from agdlm.parallel.env import DistEnv, exit_without_teardown, free_port

ROOT = Path(__file__).resolve().parents[1]


# ---- the worker side -------------------------------------------------------------------------

def join_group(rank: int, world_size: int, port: int) -> DistEnv:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return DistEnv(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))


def run_cases(env: DistEnv, out: str, cases: dict, run_one: Callable[[str, list], dict]) -> None:
    """Run each case on every rank; rank 0 rewrites `out` after each; then leave the group."""
    results = {}
    for name, overrides in cases.items():
        try:
            results[name] = run_one(name, overrides)
        except Exception:
            if env.rank == 0:
                print(f"[{name}] {traceback.format_exc()}", file=sys.stderr, flush=True)
            raise  # the other ranks would hang in a collective otherwise
        if env.rank == 0:
            Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown(0)  # DeepSpeed workers can abort in interpreter teardown


def spawn(worker: Callable, world_size: int, *args) -> None:
    """worker(rank, world_size, port, *args) on `world_size` processes."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


# ---- the pytest side -------------------------------------------------------------------------

def run_worker_script(script: str, out: Path, *args: str, cache: Path, timeout: int = 600) -> dict:
    """Run tests/<script> OUT ARGS... in a subprocess; its JSON, or a test failure with its stderr."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "AGDLM_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script), str(out), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text())
