"""The AdamW baseline as nanoGPT trains GPT-2: decay on matrices and embeddings only,
linear warmup, cosine decay to min_lr, gradient clipping."""

from __future__ import annotations

import torch
import torch.nn as nn

from agdlm.optim.kind import OptimiserKind, decay_groups, lr_at

__all__ = ["AdamWKind", "build_adamw", "lr_at", "param_groups"]

param_groups = decay_groups


def build_adamw(model: nn.Module, optim_cfg, device_type: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        decay_groups(model, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        fused=device_type == "cuda",
    )


class AdamWKind(OptimiserKind):
    name, step_name, scheduled = "adamw", "AdamW.step", True

    def build(self, model, optim_cfg, device_type):
        return build_adamw(model, optim_cfg, device_type)
