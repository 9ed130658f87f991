"""What every backend shares: mixed precision (autocast, fp16 GradScaler), averaged
gradient accumulation, the optimiser step with unscaling and optional clipping, and a
single-file checkpoint of the unwrapped model. Backends override only what differs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from agdlm.atomic_files import atomic_torch_save
from agdlm.config import ConfigError
from agdlm.parallel import CHECKPOINT_LAYOUT
from agdlm.parallel.env import DistEnv
from agdlm.parallel.safe_load import load_torch_file

MODEL_FILE = CHECKPOINT_LAYOUT["single"]  # the whole model, written by rank 0


def resolve_precision(choice: str, device: torch.device) -> str:
    if device.type != "cuda":
        if choice == "fp16":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32, bf16 or auto on CPU")
        return "fp32" if choice == "auto" else choice
    if choice == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return choice


class Backend:
    name = "single"

    def __init__(self, cfg, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.precision = resolve_precision(cfg.train.precision, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision == "fp16")
        self.model: nn.Module | None = None  # what the trainer calls forward on
        self.raw_model: nn.Module | None = None  # the plain GPT underneath any wrapper
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- setup -------------------------------------------------------------------------
    def setup(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        self.raw_model = model.to(self.env.device)
        self.model = self.wrap(self.raw_model)
        self.optimizer = make_optimizer(self.raw_model)
        if self.cfg.train.compile:
            self.model = torch.compile(self.model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    # ---- one optimiser step --------------------------------------------------------------
    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.env.device.type, dtype=dtype)

    def accumulation_context(self, is_last_micro_batch: bool):
        """Where a backend can skip gradient synchronisation on all but the last micro-batch."""
        return contextlib.nullcontext()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, accum_steps: int, is_last: bool) -> torch.Tensor:
        """Loss of one micro-batch, back-propagated divided by the number of micro-batches, so
        the gradient is the mean over the global batch. Returns the undivided loss, detached."""
        with self.accumulation_context(is_last):
            with self.autocast():
                _, loss = self.model(x, y)
            self.scaler.scale(loss / accum_steps).backward()
        return loss.detach()

    def optimizer_step(self, grad_clip: float) -> dict:
        """Unscale (fp16), clip if asked (AdamW), step unless the gradients overflowed."""
        opt = self.optimizer
        self.scaler.unscale_(opt)
        stats: dict = {}
        if grad_clip > 0:
            stats["grad_norm"] = self.clip_grad_norm(grad_clip)
        if self.scaler.is_enabled():
            scale_before = self.scaler.get_scale()
            self.scaler.step(opt)
            self.scaler.update()
            stats["skipped_step"] = self.scaler.get_scale() < scale_before
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return stats

    def flops_per_token(self) -> float:
        return self.raw_model.flops_per_token()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)

    # ---- collectives ---------------------------------------------------------------------
    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.env.distributed and self.env.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.env.world_size
        return t

    # ---- checkpoints: model.pt + optimizer.pt (+ scaler.pt) written by rank 0 -----------
    def save(self, folder: Path) -> None:
        if self.env.is_main:
            atomic_torch_save(self.raw_model.state_dict(), folder / MODEL_FILE)
            atomic_torch_save(self.optimizer.state_dict(), folder / "optimizer.pt")
            if self.scaler.is_enabled():
                atomic_torch_save(self.scaler.state_dict(), folder / "scaler.pt")

    def load(self, folder: Path) -> None:
        """Read with agdlm.parallel.safe_load: a run folder from elsewhere runs no code."""
        self.raw_model.load_state_dict(load_torch_file(folder / MODEL_FILE, map_location=self.env.device))
        self.optimizer.load_state_dict(load_torch_file(folder / "optimizer.pt", map_location=self.env.device))
        if self.scaler.is_enabled() and (folder / "scaler.pt").is_file():
            self.scaler.load_state_dict(load_torch_file(folder / "scaler.pt"))

    def full_state_dict(self) -> dict:
        """The whole model's weights on CPU (rank 0 uses it; all ranks must call it)."""
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}
