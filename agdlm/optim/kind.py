"""What every optimiser tells the trainer and the backends (OptimiserKind): how to build it
from the config, each step's lr from its schedule, what its step logs, which backends it is
correct on, and what a resume must refuse. agdlm.optim.registry maps optim.name to one."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

BACKENDS = ("single", "ddp", "fsdp2", "deepspeed")


class OptimiserRefused(ValueError):
    """This optimiser is not correct with these settings: one line that names the key."""


class OptimiserKind:
    name = ""
    step_name = ""  # the optimiser step's name in profiler traces
    backends: tuple[str, ...] = BACKENDS  # where its step is correct
    refusal = ""  # why the other backends are refused
    reads_every_gradient = False  # AGD: no clipping, fp32 gradient reduction, one ZeRO-3 sub-group
    compiles_step = False  # optim.compile reaches it (AGD's step through torch.compile)
    scheduled = False  # the trainer sets its lr each step from lr_at
    default_lr = 6e-4  # optim.lr when the config leaves it null (nanoGPT's GPT-2 AdamW lr)
    package = ""  # the optional package it needs, if any
    extra = ""  # the pyproject extra that installs it

    def check(self, cfg) -> None:
        """Raise OptimiserRefused for settings where this optimiser would be wrong, or that
        need a package this machine lacks (before the run writes anything)."""
        if self.package:
            require(self.package, self)
        if cfg.parallel.backend not in self.backends:
            raise OptimiserRefused(f"optim.name={self.name} on parallel.backend={cfg.parallel.backend}: "
                                   f"{self.refusal} (supported: {', '.join(self.backends)})")

    def build(self, model: nn.Module, optim_cfg, device_type: str) -> torch.optim.Optimizer:
        raise NotImplementedError

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int, optim_cfg, total_steps: int) -> None:
        if self.scheduled:
            lr = lr_at(step, optim_cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def grad_clip(self, optim_cfg) -> float:
        return 0.0 if self.reads_every_gradient else float(optim_cfg.grad_clip)

    def prepare_log_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called before the optimiser step of a step whose record will be logged."""

    def log_metrics(self, optimizer: torch.optim.Optimizer) -> dict:
        """This step's signals for the train record (JSONL, W&B, TensorBoard)."""
        return {"lr": optimizer.param_groups[0]["lr"]} if self.scheduled else {}

    def consecutive_skips(self, optimizer) -> torch.Tensor | None:
        """A 0-dim tensor counting steps skipped in a row, for an optimiser that skips steps."""
        return None

    def resume_problems(self, saved_cfg, cfg) -> list[str]:
        """What makes a checkpoint of saved_cfg a different experiment for this optimiser
        (beyond the optim section, which must match whole)."""
        if self.scheduled and cfg.optim.lr_decay_steps is None and saved_cfg.total_steps() != cfg.total_steps():
            return [f"the lr schedule's cosine horizon (train.max_steps/max_tokens): {saved_cfg.total_steps()} -> "
                    f"{cfg.total_steps()} steps (extending a run with a schedule changes it; set optim.lr_decay_steps "
                    "from the start to make the horizon independent of max_steps)"]
        return []

    def initialises_weights(self, optim_cfg) -> bool:
        """Whether a fresh run's weights come from the optimiser's own init (AGD's)."""
        return False

    def init_weights(self, model: nn.Module, optim_cfg) -> None:
        pass

    def shards_state(self, optim_cfg) -> bool:
        """Whether it keeps per-parameter state (FSDP2 checkpoints it through DCP)."""
        return True

    @contextlib.contextmanager
    def evaluation_weights(self, optimizer):
        """The weights this optimiser means for evaluation, in the model for the block's
        duration; the training iterate comes back bitwise after it."""
        yield

    def after_load(self, optimizer) -> None:
        """Called after a checkpoint was loaded into the model and the optimiser."""


def lr_at(step: int, optim_cfg, total_steps: int) -> float:
    """nanoGPT's schedule for optimiser step `step` (0-based): linear warmup, cosine to min_lr."""
    lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    min_lr = lr / 10 if optim_cfg.min_lr is None else optim_cfg.min_lr
    decay_steps = total_steps if optim_cfg.lr_decay_steps is None else optim_cfg.lr_decay_steps
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def decay_groups(model: nn.Module, weight_decay: float, params=None) -> list[dict]:
    """nanoGPT's split: weight decay on matrices and embeddings, none on gains and biases."""
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def require(module: str, kind: OptimiserKind):
    """Import an optional optimiser package, or refuse in one line naming its extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptimiserRefused(f"optim.name={kind.name} needs the {module} package: "
                               f"pip install 'agdlm[{kind.extra}]'") from None
