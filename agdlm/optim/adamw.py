"""The AdamW baseline as nanoGPT trains GPT-2: decay on matrices and embeddings only,
linear warmup, cosine decay to min_lr."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, optim_cfg, device_type: str) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        fused=device_type == "cuda",
    )


def lr_at(step: int, optim_cfg, total_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based)."""
    lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    min_lr = lr / 10 if optim_cfg.min_lr is None else optim_cfg.min_lr
    decay_steps = total_steps if optim_cfg.lr_decay_steps is None else optim_cfg.lr_decay_steps
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
