"""FSDP2 (torch.distributed.fsdp.fully_shard): each transformer block and the root sharded
row-wise (Shard(0)) over a device mesh; HSDP when parallel.replicate > 1 (mesh replicate x
shard). On CUDA with bf16: bf16 parameters in compute, fp32 gradient reduction.

AGD is bound to the DTensor shards (agdlm.parallel.bindings.FSDP2Binding): its one
all-reduce runs over the shard sub-mesh. Checkpoints go through torch.distributed.checkpoint
(one shard file per rank, loadable on any number of ranks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from agdlm.checkpoint import atomic_torch_save
from agdlm.config import ConfigError
from agdlm.parallel import CHECKPOINT_LAYOUT
from agdlm.parallel.base import Backend
from agdlm.parallel.safe_load import dcp_load, load_torch_file

DCP_DIR = CHECKPOINT_LAYOUT["fsdp2"]  # the sharded checkpoint inside checkpoints/step_N/


def build_mesh(device_type: str, world_size: int, replicate: int):
    if replicate < 1 or world_size % replicate != 0:
        raise ConfigError(f"parallel.replicate={replicate} must divide the world size {world_size}")
    if replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


class FSDP2Backend(Backend):
    name = "fsdp2"

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        if self.precision == "fp16":
            raise ConfigError("parallel.backend=fsdp2 supports train.precision fp32 or bf16 (fp16 needs loss scaling over shards)")
        if not env.distributed:
            raise ConfigError("parallel.backend=fsdp2 needs a process group (launch with torchrun or python -m agdlm train)")
        self.mesh = build_mesh(env.device.type, env.world_size, cfg.parallel.replicate)
        self.shard_group = self.mesh.get_group("shard")

    def setup(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        self.raw_model = self.wrap(model.to(self.env.device))
        self.model = self.raw_model
        self.optimizer = make_optimizer(self.raw_model)  # built on the DTensor parameters
        if hasattr(self.optimizer, "bind"):  # AGD: local rows + one all-reduce over the shard group
            from agdlm.parallel.bindings import FSDP2Binding

            self.optimizer.bind(FSDP2Binding(self.optimizer.params, self.shard_group))
        if self.cfg.train.compile:
            self.model = torch.compile(self.model)

    def wrap(self, model: nn.Module) -> nn.Module:
        # Every rank built (and AGD-initialised) the whole model with its own RNG stream;
        # fully_shard keeps each rank's own rows, so start from rank 0's weights everywhere.
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        kwargs: dict = {"mesh": self.mesh}
        if self.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def forward_backward(self, x, y, accum_steps, is_last):
        # Reduce-scatter only on the last micro-batch; earlier ones accumulate unsharded grads.
        self.raw_model.set_requires_gradient_sync(is_last)
        return super().forward_backward(x, y, accum_steps, is_last)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ---- checkpoints ---------------------------------------------------------------------
    def _uses_dcp_optimizer(self) -> bool:
        return self.cfg.optim.name != "agd"  # AGD has no per-parameter state

    def save(self, folder: Path) -> None:
        state = {"model": get_model_state_dict(self.raw_model)}
        if self._uses_dcp_optimizer():
            state["optim"] = get_optimizer_state_dict(self.raw_model, self.optimizer)
        dcp.save(state, checkpoint_id=str(folder / DCP_DIR))
        if not self._uses_dcp_optimizer() and self.env.is_main:
            atomic_torch_save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        state = {"model": get_model_state_dict(self.raw_model)}
        if self._uses_dcp_optimizer():
            state["optim"] = get_optimizer_state_dict(self.raw_model, self.optimizer)
        dcp_load(state, folder / DCP_DIR)  # metadata and non-tensor items unpickled with an allow-list
        set_model_state_dict(self.raw_model, state["model"])
        if self._uses_dcp_optimizer():
            set_optimizer_state_dict(self.raw_model, self.optimizer, state["optim"])
        else:
            self.optimizer.load_state_dict(load_torch_file(folder / "optimizer.pt"))

    def full_state_dict(self) -> dict:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.raw_model, options=options)
