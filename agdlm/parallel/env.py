"""Process-group setup from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, ...): nccl on CUDA, gloo on CPU."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from agdlm.config import ConfigError


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool = False  # created here, so destroyed here when the run ends

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg) -> DistEnv:
    """Join the torchrun process group when launched by torchrun; a plain `python` launch
    is one process. parallel.backend=single refuses to run on several ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and cfg.parallel.backend == "single":
        raise ConfigError(
            f"parallel.backend=single cannot run on {world_size} ranks; choose ddp, fsdp2 or deepspeed"
        )
    device = _pick_device(cfg.train.device, local_rank)
    needs_group = world_size > 1 or cfg.parallel.backend in ("fsdp2", "deepspeed")
    owns = needs_group and not dist.is_initialized()
    if owns:
        if "MASTER_ADDR" not in os.environ:  # a plain one-process launch of a distributed backend
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, store=_restart_safe_store(world_size),
                                device_id=device if device.type == "cuda" else None)
    if dist.is_initialized():  # the launcher's (or a test's) group is the truth
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device, owns_process_group=owns)


def _restart_safe_store(world_size: int):
    """Under torchrun's agent store the store outlives a restart (--max-restarts), and the
    workers' process-group keys (gloo's peer addresses) from the failed attempt are still
    there: a restarted rank could read a dead peer's address ("Connection refused" in
    connectFullMesh). Prefix the keys with the attempt number. None: torch's env:// store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                         timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"agdlm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_without_teardown(code: int = 0):
    """End a dedicated worker process now, skipping interpreter teardown. DeepSpeed worker
    processes on CPU/gloo were seen to abort at exit ("terminate called without an active
    exception", SIGABRT) in about 1 of 10 ZeRO-3 runs, after all work and
    destroy_process_group had finished; the launcher then reports a failed run. An FSDP2
    torchrun worker aborted the same way once in CI (a restarted attempt; when, not pinned)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launched_as_worker() -> bool:
    """True in a process started by torchrun or the DeepSpeed launcher (its own process)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def free_port() -> int:
    """A loopback port free right now (for a rendezvous on this machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
