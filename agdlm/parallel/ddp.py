"""DistributedDataParallel: every rank holds the whole model; gradients are averaged by
DDP's all-reduce on the last micro-batch, so AGD sees the full mean gradient locally and
needs no reduction of its own. One process without torchrun runs unwrapped."""

from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from agdlm.parallel.base import Backend


class DDPBackend(Backend):
    name = "ddp"

    ddp: DistributedDataParallel | None = None  # kept apart: torch.compile wraps self.model

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return model
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        return self.ddp

    def accumulation_context(self, is_last_micro_batch: bool):
        if self.ddp is not None and not is_last_micro_batch:
            return self.ddp.no_sync()
        return contextlib.nullcontext()
