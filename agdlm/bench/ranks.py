"""What the multi-rank benchmarks share: CPU ranks in a real gloo group, one JSON record per
rank written to a temporary folder, read back by the launching process."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from agdlm.parallel.env import exit_without_teardown, free_port


def join_cpu_group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import logging
    import warnings

    import torch
    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # DeepSpeed's deprecated torch calls would bury the figures
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def cpu_backend(rank: int, world: int, overrides: list[str]):
    """(config, backend) of this rank: the model built and bound as `agdlm train` would, on the CPU."""
    import torch

    from agdlm.config import load_config
    from agdlm.model import GPT
    from agdlm.parallel import build_backend
    from agdlm.parallel.env import DistEnv
    from agdlm.train import make_optimizer_factory

    cfg = load_config(None, overrides)
    env = DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    torch.manual_seed(0)
    backend = build_backend(cfg, env)
    backend.setup(GPT(cfg.model), make_optimizer_factory(cfg, "cpu"))
    return cfg, backend


def finish_rank(rank: int, out: str, record: dict) -> None:
    import torch.distributed as dist

    Path(f"{out}.rank{rank}").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    exit_without_teardown(0)  # DeepSpeed workers can abort in interpreter teardown


def run_ranks(worker: Callable, world: int, overrides: list[str], steps: int) -> list[dict]:
    """worker(rank, world, port, overrides, steps, out) on `world` processes; each rank's record."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        mp.spawn(worker, args=(world, free_port(), overrides, steps, out), nprocs=world, join=True)
        return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
