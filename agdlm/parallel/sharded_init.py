"""Sharded initialisation: every rank writes only the shard of each parameter it holds, and
the weights are bitwise those one process builds (`torch.manual_seed(s); GPT(cfg)`, then
AGD's `init_weights()` unless optim.init=keep) from rank 0's RNG state.

One process draws its weights from ONE stream of the CPU generator: the modules' default
init while GPT is constructed, GPT-2's normal init at the end of its __init__, then AGD's
orthogonal / rows init. `init_ops` lists those draws in order (an `InitOp` per draw or fill,
on a flat region of a logical parameter). Every rank replays the stream with its own
generator, one tensor at a time: a draw whose result is overwritten later is only drawn (to
advance the stream), a draw that survives ("final") is computed by one owner rank (the
expensive QRs are spread over the ranks by cost), kept in fp32 (the dtype GPT is built in),
then broadcast from its owner one op at a time; each rank copies the part of it that falls
in its shard. Fills (zeros/ones) are written locally.

Peak host memory per rank beyond its shards: the largest single draw (the embedding, fp32;
an orthogonal matrix in fp64 plus its QR, 2x its fp64 size) plus the final values this
rank owns until they are broadcast (about 1/N of the model in fp32). Start-up: every rank
draws the whole stream (cheap next to the QRs), the QRs are split N ways, and the model is
broadcast once (as FSDP2's rank-0 broadcast did before)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from agdlm.optim.registry import kind_of

RANDOM_KINDS = ("kaiming_uniform", "uniform", "normal", "orthogonal", "rows")


@dataclass
class InitOp:
    param: int  # index into unique_parameters(model)
    start: int  # flat region [start, stop) of the logical parameter, row-major
    stop: int
    shape: tuple[int, ...]  # the shape the values are drawn in
    kind: str  # kaiming_uniform | uniform | normal | orthogonal | rows | zeros | ones
    args: tuple = ()

    @property
    def random(self) -> bool:
        return self.kind in RANDOM_KINDS

    def cost(self) -> float:
        n = self.stop - self.start
        if self.kind == "orthogonal":  # Householder QR ~ 2 m n^2
            rows = self.shape[0]
            return 2.0 * n * min(rows, n // max(rows, 1))
        return float(n)


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # deduplicates tied parameters, in registration order


def _whole(index: dict[int, int], p: torch.Tensor, kind: str, *args) -> InitOp:
    return InitOp(index[id(p)], 0, p.numel(), tuple(p.shape), kind, args)


def construction_ops(model: nn.Module, index: dict[int, int]) -> list[InitOp]:
    """The default init each module runs in its __init__ (modules() is construction order
    for GPT). A tied weight receives the draws of both modules: the stream advances for both."""
    ops = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            ops.append(_whole(index, module.weight, "kaiming_uniform", math.sqrt(5)))
            if module.bias is not None:
                fan_in = module.weight.shape[1]
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                ops.append(_whole(index, module.bias, "uniform", -bound, bound))
        elif isinstance(module, nn.Embedding):
            if module.padding_idx is not None:
                raise NotImplementedError("sharded init: nn.Embedding with padding_idx")
            ops.append(_whole(index, module.weight, "normal", 0.0, 1.0))
        elif isinstance(module, nn.LayerNorm):
            ops += _layernorm_fills(index, module)
        elif any(True for _ in module.parameters(recurse=False)):
            raise NotImplementedError(f"sharded init: no recipe for {type(module).__name__}")
    return ops


def _layernorm_fills(index, module) -> list[InitOp]:
    ops = []
    if module.weight is not None:
        ops.append(_whole(index, module.weight, "ones"))
    if module.bias is not None:
        ops.append(_whole(index, module.bias, "zeros"))
    return ops


def normal_init_ops(model: nn.Module, index: dict[int, int]) -> list[InitOp]:
    """GPT.init_weights_normal, draw for draw (agdlm/model.py; the equality tests keep the two
    in step)."""
    ops = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            ops.append(_whole(index, module.weight, "normal", 0.0, 0.02))
            if getattr(module, "bias", None) is not None:
                ops.append(_whole(index, module.bias, "zeros"))
        elif isinstance(module, nn.LayerNorm):
            ops += _layernorm_fills(index, module)
    std = 0.02 / math.sqrt(2 * model.config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            ops.append(_whole(index, p, "normal", 0.0, std))
    return ops


def agd_init_ops(model: nn.Module, index: dict[int, int], policy: str, gain: float) -> list[InitOp]:
    """AGD.init_weights: the policy's parts in plan order (the plan is built on the meta model)."""
    from agdlm.optim.agd import AGD

    plan_owner = AGD(model, policy=policy, gain=gain)
    ops = []
    for component in plan_owner.plan.components:
        for part in component.parts:
            if part.init not in ("orthogonal", "rows", "zeros", "ones"):
                continue  # "none": the weights stay as they are
            p = plan_owner.params[part.param_index]
            ops.append(InitOp(index[id(p)], part.start, part.stop, tuple(part.shape), part.init, (part.init_scale,)))
    return ops


def init_ops(model: nn.Module, cfg) -> list[InitOp]:
    """Every draw and fill of a fresh single-process run's init, in stream order."""
    index = {id(p): i for i, p in enumerate(unique_parameters(model))}
    ops = construction_ops(model, index) + normal_init_ops(model, index)
    if kind_of(cfg.optim.name).initialises_weights(cfg.optim):  # AGD's init
        ops += agd_init_ops(model, index, cfg.optim.policy, cfg.optim.gain)
    return ops


def final_ops(ops: list[InitOp]) -> list[bool]:
    """For each op: does any of its region survive the ops after it?"""
    final = [False] * len(ops)
    covered: dict[int, list[tuple[int, int]]] = {}
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        spans = covered.setdefault(op.param, [])
        final[i] = not _inside(op.start, op.stop, spans)
        spans.append((op.start, op.stop))
    return final


def _inside(start: int, stop: int, spans: list[tuple[int, int]]) -> bool:
    at = start
    for a, b in sorted(spans):
        if a > at:
            break
        at = max(at, b)
        if at >= stop:
            return True
    return at >= stop


def assign_owners(ops: list[InitOp], final: list[bool], world_size: int) -> dict[int, int]:
    """Final random ops -> the rank that computes them: largest first to the least loaded."""
    load = [0.0] * world_size
    owners = {}
    for i in sorted((i for i, op in enumerate(ops) if final[i] and op.random), key=lambda i: -ops[i].cost()):
        rank = min(range(world_size), key=load.__getitem__)
        owners[i] = rank
        load[rank] += ops[i].cost()
    return dict(sorted(owners.items()))


# ---- drawing, exactly as the single-process code draws ------------------------------------
def draw(op: InitOp, generator: torch.Generator, compute: bool) -> torch.Tensor | None:
    """Advance `generator` as the single-process init does for `op`; with `compute`, return
    the op's values (flat, fp32) as that init writes them."""
    if op.kind == "kaiming_uniform":
        t = torch.empty(op.shape)
        nn.init.kaiming_uniform_(t, a=op.args[0], generator=generator)
    elif op.kind == "uniform":
        t = torch.empty(op.shape)
        nn.init.uniform_(t, *op.args, generator=generator)
    elif op.kind == "normal":
        t = torch.empty(op.shape)
        nn.init.normal_(t, *op.args, generator=generator)
    elif op.kind == "orthogonal":
        return _orthogonal(op, generator, compute)
    elif op.kind == "rows":
        x = torch.randn(op.shape, dtype=torch.float64, generator=generator)
        if not compute:
            return None
        x *= op.args[0] / x.norm(dim=1, keepdim=True)
        t = x.to(torch.get_default_dtype())
    else:
        raise ValueError(f"not a random op: {op.kind}")
    return t.view(-1) if compute else None


def _orthogonal(op: InitOp, generator: torch.Generator, compute: bool) -> torch.Tensor | None:
    from agdlm.optim.agd import orthogonal_draw, orthogonal_fp64

    if compute:
        return orthogonal_fp64(op.shape, generator).mul_(op.args[0]).to(torch.get_default_dtype()).reshape(-1)
    if math.prod(op.shape):  # only advance the stream past the draw
        orthogonal_draw(op.shape, generator)
    return None


# ---- writing into the shards ---------------------------------------------------------------
@dataclass
class LocalShard:
    """This rank's piece of one logical parameter: `flat` holds elements [start, start + numel)
    of the parameter flattened row-major."""

    flat: torch.Tensor
    start: int

    def write(self, op: InitOp, values: torch.Tensor | None) -> None:
        lo, hi = max(op.start, self.start), min(op.stop, self.start + self.flat.numel())
        if lo >= hi:
            return
        target = self.flat[lo - self.start : hi - self.start]
        if op.kind == "zeros":
            target.zero_()
        elif op.kind == "ones":
            target.fill_(1.0)
        else:
            target.copy_(values[lo - op.start : hi - op.start])


@torch.no_grad()
def initialise_shards(ops: list[InitOp], shards: list[LocalShard], rng_state: torch.Tensor, group=None,
                      device: torch.device | None = None) -> None:
    """Write every rank's shards (collective over `group`, default the world). `shards[i]`
    is this rank's piece of parameter i; `rng_state` the CPU generator state one process
    would start the model from (the same on every rank); `device` where the broadcasts run
    (the shards' device: NCCL needs CUDA tensors)."""
    device = device or torch.device("cpu")
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    final = final_ops(ops)
    owners = assign_owners(ops, final, world)
    owned = _draw_all(ops, final, owners, rank, rng_state)
    for i, op in enumerate(ops):
        if not final[i]:
            continue
        values = None
        if op.random:
            values = owned.pop(i, None)
            if world > 1:
                values = _broadcast_values(values, op, owners[i], group, device)
        shards[op.param].write(op, values)


def _draw_all(ops, final, owners, rank, rng_state) -> dict[int, torch.Tensor]:
    """Replay the whole stream; compute (QR included) only the final ops this rank owns."""
    generator = torch.Generator()
    generator.set_state(rng_state)
    owned = {}
    for i, op in enumerate(ops):
        if op.random:
            values = draw(op, generator, compute=owners.get(i) == rank)
            if values is not None:
                owned[i] = values
    return owned


def _broadcast_values(values, op: InitOp, owner: int, group, device) -> torch.Tensor:
    values = torch.empty(op.stop - op.start, device=device) if values is None else values.to(device)
    src = dist.get_global_rank(group, owner) if group is not None else owner
    dist.broadcast(values, src=src, group=group)
    return values


def fill_shards(ops: list[InitOp] | None, shards: list[LocalShard], device) -> None:
    """A fresh run's initial values in every local shard (ops from init_ops), or zeros when
    a checkpoint is about to overwrite them (ops None)."""
    if ops is None:
        for shard in shards:
            shard.flat.zero_()
        return
    initialise_shards(ops, shards, shared_rng_state(), device=device)


def shared_rng_state(group=None) -> torch.Tensor:
    """Rank 0's CPU generator state, on every rank: the state one process builds from."""
    state = [torch.get_rng_state()]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(state, src=src, group=group)  # any backend (NCCL needs no CPU tensor)
    return state[0]


def meta_model(model_cfg) -> nn.Module:
    """GPT with every parameter on the meta device: shapes, no storage, no draws."""
    from agdlm.model import GPT

    with torch.device("meta"):
        return GPT(model_cfg)
