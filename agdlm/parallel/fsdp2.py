"""FSDP2 (torch.distributed.fsdp.fully_shard): each transformer block and the root sharded
row-wise (Shard(0)) over a device mesh; HSDP when parallel.replicate > 1 (mesh replicate x
shard). On CUDA with bf16: bf16 parameters in compute, fp32 gradient reduction.

AGD is bound to the DTensor shards (agdlm.parallel.bindings.FSDP2Binding): its one
all-reduce runs over the shard sub-mesh. Checkpoints go through torch.distributed.checkpoint
(one shard file per rank, loadable on any number of ranks)."""

from __future__ import annotations

import math
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

from agdlm.atomic_files import atomic_torch_save
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


def local_shard(p: torch.Tensor):
    """This rank's rows of a Shard(0) DTensor parameter, flat, with their offset in the
    flattened logical tensor (HSDP replicas hold the same rows)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from agdlm.parallel.sharded_init import LocalShard

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    strides = [math.prod(p.shape[d + 1 :]) for d in range(p.dim())]
    return LocalShard(p._local_tensor.detach().view(-1), sum(o * s for o, s in zip(offset, strides)))


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
        """A whole model built on every rank: start from rank 0's weights, then shard."""
        model = model.to(self.env.device)
        with torch.no_grad():  # every rank initialised with its own RNG stream
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        self._finish_setup(self.wrap(model), make_optimizer)

    def builds_sharded(self) -> bool:
        return not self.cfg.model.init_from  # an HF/agdlm file is read whole

    def setup_sharded(self, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], fresh: bool) -> None:
        """Build on the meta device, shard, then materialise only this rank's rows: on a fresh
        run with one process's init (agdlm.parallel.sharded_init), on a resume with zeros
        (the checkpoint overwrites them)."""
        from agdlm.parallel import sharded_init

        model = sharded_init.meta_model(self.cfg.model)
        ops = sharded_init.init_ops(model, self.cfg) if fresh else None  # the AGD plan needs the meta shapes
        self.wrap(model)
        model.to_empty(device=self.env.device)  # DTensor parameters are swapped in place: ties survive
        shards = [local_shard(p) for p in sharded_init.unique_parameters(model)]
        sharded_init.fill_shards(ops, shards, self.env.device)
        self._finish_setup(model, make_optimizer)

    def _finish_setup(self, model: nn.Module, make_optimizer) -> None:
        self.raw_model = self.model = model
        self.optimizer = make_optimizer(self.raw_model)  # built on the DTensor parameters
        if hasattr(self.optimizer, "bind"):  # AGD: local rows + one all-reduce over the shard group
            from agdlm.parallel.bindings import FSDP2Binding

            self.optimizer.bind(FSDP2Binding(self.optimizer.params, self.shard_group))
        if self.cfg.train.compile:
            self.model = torch.compile(self.model)

    def wrap(self, model: nn.Module) -> nn.Module:
        """fully_shard each transformer block, then the root (torchtitan's order)."""
        kwargs: dict = {"mesh": self.mesh}
        if self.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def forward_backward(self, x, y, accum_steps, is_last):
        # parallel.fsdp_reshard_grads (default, as torchtitan): every micro-batch reduce-scatters
        # and FSDP2 sums into the sharded gradient. Off: earlier micro-batches accumulate whole
        # unsharded gradients and only the last reduce-scatters (fewer collectives, more memory).
        if not self.cfg.parallel.fsdp_reshard_grads:
            self.raw_model.set_requires_gradient_sync(is_last)
        return super().forward_backward(x, y, accum_steps, is_last)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ---- checkpoints ---------------------------------------------------------------------
    def _uses_dcp_optimizer(self) -> bool:
        """AdamW's state, and AGD's momentum buffers (DTensors of the parameters' placement),
        are sharded: DCP. The faithful AGD has no per-parameter state: one optimizer.pt."""
        from agdlm.optim.registry import kind_of

        return kind_of(self.cfg.optim.name).shards_state(self.cfg.optim)

    def _optimizers(self):
        """What DCP checkpoints: the optimiser, or each part of one made of parts (Muon + AdamW)."""
        return list(self.optimizer.parts.values()) if hasattr(self.optimizer, "parts") else self.optimizer

    def save(self, folder: Path) -> None:
        state = {"model": get_model_state_dict(self.raw_model)}
        if self._uses_dcp_optimizer():
            state["optim"] = get_optimizer_state_dict(self.raw_model, self._optimizers())
        dcp.save(state, checkpoint_id=str(folder / DCP_DIR))
        if not self._uses_dcp_optimizer() and self.env.is_main:
            atomic_torch_save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        state = {"model": get_model_state_dict(self.raw_model)}
        if self._uses_dcp_optimizer():
            state["optim"] = get_optimizer_state_dict(self.raw_model, self._optimizers())
        dcp_load(state, folder / DCP_DIR)  # metadata and non-tensor items unpickled with an allow-list
        set_model_state_dict(self.raw_model, state["model"])
        if self._uses_dcp_optimizer():
            set_optimizer_state_dict(self.raw_model, self._optimizers(), state["optim"])
        else:
            self.optimizer.load_state_dict(load_torch_file(folder / "optimizer.pt"))

    def full_state_dict(self) -> dict:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.raw_model, options=options)
