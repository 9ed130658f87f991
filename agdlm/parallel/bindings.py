"""AGD bindings: for each logical parameter the optimiser was built with, the pieces this
rank holds, and the one process group the partial sums are reduced over.

The contract (agdlm/optim/agd.py): ``pieces(index)`` -> [(start, weight, grad)] with
``start`` the flat offset of the piece in the logical tensor flattened row-major, ``weight``
a contiguous view updated in place, ``grad`` the matching view of the averaged gradient, of
the same shape (or None): 1-D for a piece of a flattened tensor, or the shard's own shape
(the optimiser flattens only where it cuts a piece); ``reduce(vec)`` sums over the ranks
that shard the parameters. Nothing is gathered.

- FSDP2: DTensor ``to_local()`` rows (Shard(0)); reduce over the shard sub-mesh (HSDP
  replicas already hold the same averaged gradient and update identically).
- DeepSpeed ZeRO 1/2: the fragment of the optimiser's fp32 flat partition that maps to each
  model parameter (``p._hp_mapping``); reduce over the partition group.
- DeepSpeed ZeRO 3: the parameter's partition inside the fp32 sub-group flat
  (``grad_position``); reduce over the sub-group's partition group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


# The bindings read private internals; these are the versions they were tested with.
TESTED = {"torch": "2.13.0", "deepspeed": "0.19.8"}


class BindingInternalsMissing(RuntimeError):
    """A private attribute an AGD binding reads is gone: an untested torch or DeepSpeed."""


def require(obj, attrs: tuple[str, ...], package: str) -> None:
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        import importlib.metadata as md

        raise BindingInternalsMissing(
            f"AGD's {package} binding needs {', '.join(missing)} on {type(obj).__name__}, which {package} "
            f"{md.version(package)} does not have (tested: {package} {TESTED[package]})")


def _all_reduce_sum(vec: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
    return vec


class FSDP2Binding:
    """Pieces are this rank's rows of each Shard(0) DTensor parameter."""

    def __init__(self, params: list[torch.Tensor], shard_group):
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        self.params, self.group = params, shard_group
        self.starts: list[int] = []
        for p in params:
            if not isinstance(p, DTensor):
                raise RuntimeError("FSDP2 binding: a parameter is not a DTensor; fully_shard the root module")
            require(p, ("_local_tensor", "device_mesh", "placements"), "torch")
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            strides = [math.prod(p.shape[d + 1 :]) for d in range(p.dim())]
            self.starts.append(sum(o * s for o, s in zip(offset, strides)))
        # Local weight views cached per storage: DTensor.to_local() goes through autograd each
        # call (~30 ms per step at 1.5B's tensor count); revalidated by data pointer. Pieces
        # keep the shard's shape: no view per gradient per step.
        self._weights: dict[int, tuple[int, torch.Tensor]] = {}

    def grad_storages(self):
        return [(p, None if p.grad is None else p.grad._local_tensor) for p in self.params]

    def pieces(self, index: int, grads: list | None = None):
        p = self.params[index]
        local = p._local_tensor  # the shard DTensor holds; to_local() without the autograd hop
        cached = self._weights.get(index)
        if cached is None or cached[0] != local.data_ptr():
            cached = (local.data_ptr(), local.detach())
            self._weights[index] = cached
        g = (None if p.grad is None else p.grad._local_tensor) if grads is None else grads[index]
        return [(self.starts[index], cached[1], g)]

    def reduce(self, vec: torch.Tensor) -> torch.Tensor:
        return _all_reduce_sum(vec, self.group)


class DeepSpeedZeroBinding:
    """ZeRO 1/2 (and bf16's BF16_Optimizer): pieces are the fragments of the fp32 flat
    partition linked to each model parameter by DeepSpeed's ``_hp_mapping``."""

    def __init__(self, params: list[torch.Tensor], zero_optimizer):
        self.params, self.z = params, zero_optimizer
        if not hasattr(zero_optimizer, "fp32_groups_flat_partition"):
            require(zero_optimizer, ("single_partition_of_fp32_groups",), "deepspeed")
        flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
        if flats is None:
            flats = zero_optimizer.fp32_groups_flat_partition  # BF16_Optimizer
        if len(flats) != 1:
            raise RuntimeError(
                f"AGD on DeepSpeed needs the optimiser's parameters in ONE param group (got {len(flats)}): "
                "every layer's norm must be known before any update"
            )
        self.flat = flats[0]
        groups = getattr(zero_optimizer, "real_dp_process_group", None) or getattr(zero_optimizer, "dp_process_group", None)
        self.group = groups[0] if isinstance(groups, (list, tuple)) else groups
        if getattr(zero_optimizer, "round_robin_gradients", False):
            raise RuntimeError("AGD on DeepSpeed: round_robin_gradients reorders the flat partition; turn it off")

        self._fragments: dict[int, tuple | None] = {}  # index -> (lp start, hp start, numel, weight view)

    def grad_storages(self):
        return [(self.flat, self.flat.grad)]

    def pieces(self, index: int, grads: list | None = None):
        if getattr(self, "_flat_ptr", None) != self.flat.data_ptr():  # the partition moved: re-read
            self._fragments, self._flat_ptr = {}, self.flat.data_ptr()
        frag = self._fragments.get(index, ())
        if frag == ():  # the mapping is fixed once the engine is built: read it once
            mapping = getattr(self.params[index], "_hp_mapping", None)
            frag = None
            if mapping is not None:
                hp = mapping.get_hp_fragment_address()
                frag = (mapping.lp_fragment_address.start, hp.start, hp.numel,
                        self.flat.detach().narrow(0, hp.start, hp.numel))
            self._fragments[index] = frag
        if frag is None:
            return []
        lp_start, hp_start, numel, w = frag
        grad = self.flat.grad if grads is None else grads[0]
        return [(lp_start, w, None if grad is None else grad.narrow(0, hp_start, numel))]

    def reduce(self, vec: torch.Tensor) -> torch.Tensor:
        return _all_reduce_sum(vec, self.group)


class DeepSpeedZero3Binding:
    """ZeRO 3: parameter p's partition on rank r is elements [r*c, r*c + c) of its flattened
    logical tensor (c = p.partition_numel(), the last partition padded); it lives at
    ``grad_position`` in the fp32 flat of its sub-group."""

    def __init__(self, params: list[torch.Tensor], zero_optimizer):
        self.params, self.z = params, zero_optimizer
        require(zero_optimizer, ("fp32_partitioned_groups_flat", "grad_position", "get_param_id"), "deepspeed")
        self.flats = zero_optimizer.fp32_partitioned_groups_flat
        if len(self.flats) != 1:
            raise RuntimeError(
                f"AGD on DeepSpeed ZeRO 3 needs ONE optimiser sub-group (got {len(self.flats)}); "
                "the backend sets zero_optimization.sub_group_size large enough"
            )
        self.group = zero_optimizer._get_sub_group_process_group(0) if hasattr(zero_optimizer, "_get_sub_group_process_group") else zero_optimizer.dp_process_group
        self.rank = dist.get_rank(self.group)
        self._weights: dict[int, tuple[tuple, torch.Tensor]] = {}

    def grad_storages(self):
        return [(flat, flat.grad) for flat in self.flats]

    def pieces(self, index: int, grads: list | None = None):
        p = self.params[index]
        sg, offset, _ = self.z.grad_position[self.z.get_param_id(p)]
        chunk = p.partition_numel()
        start = self.rank * chunk
        numel = max(0, min(chunk, p.ds_numel - start))
        flat = self.flats[sg]
        cached = self._weights.get(index)  # the same view each step while the flat stays put
        if cached is None or cached[0] != (flat.data_ptr(), offset, numel):
            cached = ((flat.data_ptr(), offset, numel), flat.detach().narrow(0, offset, numel))
            self._weights[index] = cached
        w = cached[1]
        grad = flat.grad if grads is None else grads[sg]
        return [(start, w, None if grad is None else grad.narrow(0, offset, numel))]

    def reduce(self, vec: torch.Tensor) -> torch.Tensor:
        return _all_reduce_sum(vec, self.group)
