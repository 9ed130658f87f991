"""DeepSpeed ZeRO 1/2/3 through `deepspeed.initialize` with a config generated from ours
(`deepspeed_config`; the same shape as the JSON templates in launch/).

The trainer's optimiser (AGD or AdamW) is DeepSpeed's client optimiser. For AGD the backend
asserts what silently changes eta: gradient clipping off, round-robin gradients off,
gradients accumulated and reduced in fp32; keeps the optimiser in ONE param group (and ONE
ZeRO-3 sub-group) so DeepSpeed calls its step once, with every gradient present; and binds
it to the fp32 partition (agdlm.parallel.bindings). DeepSpeed runs accumulation itself:
`forward_backward` calls engine.backward (which divides by the accumulation steps) and
engine.step on every micro-batch; the optimiser steps at the boundary."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from agdlm.config import ConfigError
from agdlm.optim.registry import kind_of
from agdlm.parallel import CHECKPOINT_LAYOUT
from agdlm.parallel.base import Backend
from agdlm.parallel.safe_load import CheckpointReadError, safe_deepspeed_checkpoint_engine

TAG = CHECKPOINT_LAYOUT["deepspeed"]  # the engine's checkpoint lives in checkpoints/step_N/deepspeed/
ONE_SUB_GROUP = 10**15  # ZeRO-3 sub_group_size large enough that AGD sees one sub-group
# DeepSpeed's defaults (elements): sized for big models on big GPUs, they are the caps below.
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_MAX_LIVE = DS_MAX_REUSE = 1_000_000_000


def block_numel(model_cfg) -> int:
    """Parameters of one transformer block (4 d^2 attention + 8 d^2 MLP, biases, 2 LayerNorms)."""
    d = model_cfg.n_embd
    return 12 * d * d + (9 * d if model_cfg.bias else 0) + 2 * d * (2 if model_cfg.bias else 1)


def zero3_sizes(model_cfg) -> dict:
    """ZeRO-3 buckets and gather limits in units of one transformer block, capped by
    DeepSpeed's defaults. The defaults keep a small model whole: with max_reuse_distance and
    max_live_parameters at 1e9 elements, every parameter gathered in the forward stays gathered
    until it is used again in the backward (the whole model on every rank), and the 5e8-element
    reduce bucket holds every gradient at once. Here: reduce and prefetch one block at a time,
    keep at most two blocks' worth gathered beyond the module running. GPT-2-1.5B (d=1600): 31M
    elements per block, 123 MB in fp32 per bucket (DeepSpeed's: 2 GB)."""
    block = block_numel(model_cfg)
    return {
        "reduce_bucket_size": min(DS_REDUCE_BUCKET, block),
        "stage3_prefetch_bucket_size": min(DS_PREFETCH_BUCKET, block),
        "stage3_max_live_parameters": min(DS_MAX_LIVE, 2 * block),
        "stage3_max_reuse_distance": min(DS_MAX_REUSE, 2 * block),
    }


def deepspeed_config(cfg, world_size: int, precision: str) -> dict:
    """The engine config. Both optimisers: gradient reduction overlapped with the backward
    (`overlap_comm`; the AGD bindings read the reduced fp32 partition at step time, which the
    equality tests check with it on). AGD only: clipping off, fp32 gradient reduction, one
    ZeRO-3 sub-group (every layer's norm before any update), and no DeepSpeed global gradient
    norm on ZeRO 1/2 where DeepSpeed allows skipping it (not ZeRO-1's BF16_Optimizer, not
    ZeRO-3): AGD never reads it, and it costs a host sync per step. ZeRO-3, both optimisers: buckets
    and gather limits sized to the model (zero3_sizes)."""
    agd = kind_of(cfg.optim.name).reads_every_gradient  # AGD
    stage = cfg.parallel.zero_stage
    zero: dict = {
        "stage": stage,
        "round_robin_gradients": False,
        "contiguous_gradients": True,
        "overlap_comm": True,
    }
    if stage == 3:
        zero.update(zero3_sizes(cfg.model))
    if agd and stage == 3:
        zero["sub_group_size"] = ONE_SUB_GROUP
    if agd and stage in (1, 2) and not (stage == 1 and precision == "bf16"):
        zero["compute_grad_norm"] = False
    ds: dict = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": 0.0 if agd else float(cfg.optim.grad_clip),
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000}
    if agd and precision in ("bf16", "fp16"):
        ds["communication_data_type"] = "fp32"  # AdamW reduces in the compute dtype, DeepSpeed's default
    return ds


def storageless_parameters(model: nn.Module, dtype: torch.dtype, device: torch.device) -> list[nn.Parameter]:
    """Replace each meta parameter (ties kept) by one on `device` with its shape and no memory
    (a stride-0 view of one element), so optimisers can be built on it before ZeRO-3
    partitions it."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in replaced:
                view = torch.zeros((), dtype=dtype, device=device).expand(p.shape)
                replaced[id(p)] = nn.Parameter(view, requires_grad=p.requires_grad)
            module._parameters[name] = replaced[id(p)]
    return list(model.parameters())


def partition_zero3(params: list[nn.Parameter], ds_config: dict, dtype: torch.dtype, device: torch.device) -> list:
    """Turn each parameter into a ZeRO-3 partitioned one, one at a time (peak: one whole
    parameter, uninitialised), the way deepspeed.zero.Init does at construction, minus its
    broadcast (the values are written afterwards). Returns this rank's partition of each as
    a sharded_init.LocalShard: elements [r*c, r*c + c) of the flattened parameter (c =
    partition_numel; the padding of the last partition is left out)."""
    import deepspeed

    from agdlm.parallel.sharded_init import LocalShard

    deepspeed.init_distributed(dist_init_required=False)  # joins our group; the config reads its world size
    zero_init = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype)
    if zero_init.mem_efficient_linear:
        # What deepspeed.zero.Init does when entered, and the engine when it partitions a built
        # model: F.linear saves the partitioned parameter, not a view of its gathered data, for
        # the backward. Without it every gathered weight stays alive until its backward (the
        # whole model per rank by the end of the forward).
        zero_init._enable_mem_efficient_linear()
    shards = []
    for p in params:
        p.data = torch.empty(p.shape, dtype=dtype, device=device)
        zero_init._convert_to_deepspeed_param(p)  # DeepSpeed 0.19's per-parameter conversion
        p.partition()
        rank = dist.get_rank(p.ds_process_group)
        chunk = p.partition_numel()
        start = rank * chunk
        valid = max(0, min(chunk, p.ds_numel - start))
        shards.append(LocalShard(p.ds_tensor.detach().view(-1).narrow(0, 0, valid), start))
    return shards


def check_agd_precision(cfg, precision: str) -> None:
    """AGD's norms need fp32 gradients; DeepSpeed's fp16 optimiser accumulates and reduces
    them in fp16. The config check catches train.precision=fp16; this catches `auto`
    resolving to fp16 (a GPU without bf16), before any engine is built."""
    if kind_of(cfg.optim.name).reads_every_gradient and precision == "fp16":
        raise ConfigError(
            f"train.precision={cfg.train.precision} resolves to fp16 on this GPU (no bf16), and DeepSpeed's fp16 "
            "optimiser reduces gradients in fp16, which AGD's norms cannot use: set train.precision=fp32")


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        check_agd_precision(cfg, self.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)  # DeepSpeed scales fp16 itself
        self.engine = None

    def setup(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        model = model.to(self.env.device)
        self._flops_per_token = model.flops_per_token()  # before ZeRO-3 empties the parameters
        self._initialize(model, make_optimizer(model))

    def builds_sharded(self) -> bool:
        return self.cfg.parallel.zero_stage == 3 and not self.cfg.model.init_from

    def setup_sharded(self, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], fresh: bool) -> None:
        """ZeRO-3: build on the meta device, give the parameters their shapes on the device
        without memory (stride-0 views) so the optimiser can be built, partition them one at a
        time, then write this rank's partitions: one process's init on a fresh run
        (agdlm.parallel.sharded_init), zeros on a resume (the checkpoint overwrites them)."""
        from agdlm.parallel import sharded_init

        model = sharded_init.meta_model(self.cfg.model)
        ops = sharded_init.init_ops(model, self.cfg) if fresh else None
        self._flops_per_token = model.flops_per_token()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        params = storageless_parameters(model, dtype, self.env.device)
        client = make_optimizer(model)
        self.ds_config = deepspeed_config(self.cfg, self.env.world_size, self.precision)
        shards = partition_zero3(params, self.ds_config, dtype, self.env.device)
        sharded_init.fill_shards(ops, shards, self.env.device)
        del shards, ops  # views of the first partitions: the engine moves them into its flat buffer
        self._initialize(model, client)

    def _initialize(self, model: nn.Module, client: torch.optim.Optimizer) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.ds_config = deepspeed_config(self.cfg, self.env.world_size, self.precision)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=self.ds_config, dist_init_required=False)
        self.engine, self.model, self.raw_model, self.optimizer = engine, engine, engine.module, client
        if hasattr(client, "bind"):
            self._bind_agd(client)
        if self.cfg.train.compile:
            self.engine.compile()

    def _bind_agd(self, opt) -> None:
        from agdlm.parallel.bindings import DeepSpeedZero3Binding, DeepSpeedZeroBinding

        engine = self.engine
        if engine.gradient_clipping() != 0:
            raise RuntimeError(f"AGD on DeepSpeed needs gradient_clipping=0 (got {engine.gradient_clipping()})")
        if self.precision in ("bf16", "fp16"):
            grad_accum_dtype = engine.get_data_types()[1]
            if grad_accum_dtype != torch.float32 or engine.communication_data_type != torch.float32:
                raise RuntimeError(
                    f"AGD on DeepSpeed needs fp32 gradient accumulation and reduction (got {grad_accum_dtype}, "
                    f"{engine.communication_data_type})"
                )
        zero = engine.optimizer
        binding_cls = DeepSpeedZero3Binding if self.cfg.parallel.zero_stage == 3 else DeepSpeedZeroBinding
        opt.bind(binding_cls(opt.params, zero))

    def flops_per_token(self) -> float:
        return self._flops_per_token

    def autocast(self):
        return contextlib.nullcontext()  # the engine holds the parameters in the compute dtype

    def forward_backward(self, x, y, accum_steps, is_last):
        _, loss = self.engine(x, y)
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        if not is_last:
            self.engine.step()  # a micro-step: DeepSpeed counts it, the optimiser does not run
        return loss.detach()

    def optimizer_step(self, grad_clip: float) -> dict:
        engine = self.engine
        if not engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed micro-step count is off: the step is not at an accumulation boundary")
        skipped_before = engine.skipped_steps
        engine.step()  # clipping (AdamW only) is in the DeepSpeed config
        stats: dict = {"skipped_step": engine.skipped_steps > skipped_before}
        if grad_clip > 0:
            norm = engine.get_global_grad_norm()
            if norm is not None:
                stats["grad_norm"] = float(norm)
        return stats

    # ---- checkpoints: the engine's own (model + partitioned optimiser state) ------------
    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        self._read_checkpoints_safely()
        path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointReadError(folder / TAG, "holds no DeepSpeed checkpoint")

    def _read_checkpoints_safely(self) -> None:
        """DeepSpeed's torch checkpoint engine unpickles with weights_only=False; every file
        the engine loads goes through its checkpoint engine, so swap in one that reads with an
        allow-list (agdlm.parallel.safe_load). Another engine kind is refused, not trusted."""
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        current = self.engine.checkpoint_engine
        if type(current) is not TorchCheckpointEngine:
            if getattr(current, "reads_safely", False):
                return
            raise RuntimeError(f"cannot load DeepSpeed checkpoints safely with {type(current).__name__}")
        self.engine.checkpoint_engine = safe_deepspeed_checkpoint_engine(self.engine._config)

    def full_state_dict(self) -> dict:
        params = list(self.raw_model.parameters())
        gather = contextlib.nullcontext()
        if self.cfg.parallel.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            return {k: v.detach().float().cpu().clone() for k, v in self.raw_model.state_dict().items()}
