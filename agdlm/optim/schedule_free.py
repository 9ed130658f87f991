"""Schedule-free AdamW (schedulefree.AdamWScheduleFree): no lr schedule, its own linear
warmup over optim.warmup_steps. Its published self-tuning setting (AlgoPerf) is lr 0.0025,
weight decay 0.081, warmup 2% of the steps (configs/optim/schedulefree.yaml); betas and eps
are the AdamW baseline's.

Its parameters hold the training iterate y; the weights it means for evaluation are the
average x, which optimizer.eval() swaps in. agdlm evaluates, checkpoints (model.pt is x,
so export, sample and eval read the right weights) and logs on x, and puts y back bitwise
afterwards: a checkpoint carries y in the optimiser state ("train_iterate") for resume."""

from __future__ import annotations

import contextlib

import torch

from agdlm.optim.kind import OptimiserKind, decay_groups, require

TRAIN_ITERATE = "train_iterate"


def _params(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"]]


class ScheduleFreeKind(OptimiserKind):
    name, step_name = "schedulefree", "AdamWScheduleFree.step"
    package, extra = "schedulefree", "baselines"
    default_lr = 0.0025
    backends = ("single", "ddp")
    # Measured on 2 gloo ranks: its steps match one process on FSDP2, but a DCP resume loads into
    # an empty state (it creates z lazily in step), so resume would silently restart z; DeepSpeed
    # ZeRO swaps in flat partitions its state is not keyed by (KeyError at the first step).
    refusal = "a resume would lose its state (FSDP2's DCP load) or its step fails (ZeRO's flat partitions)"

    def build(self, model, optim_cfg, device_type):
        schedulefree = require(self.package, self)
        optimizer = schedulefree.AdamWScheduleFree(decay_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                                                   betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                                   warmup_steps=optim_cfg.warmup_steps)
        optimizer.train()  # it starts in eval mode and refuses to step there
        return optimizer

    def log_metrics(self, optimizer) -> dict:
        group = optimizer.param_groups[0]
        return {"lr": float(group.get("scheduled_lr", 0.0)), "schedulefree_lr_max": float(group["lr_max"])}

    @contextlib.contextmanager
    def evaluation_weights(self, optimizer):
        params = _params(optimizer)
        with torch.no_grad():
            for p in params:  # y, exactly: eval() then train() would round it
                optimizer.state[p][TRAIN_ITERATE] = p.detach().clone()
        optimizer.eval()
        try:
            yield
        finally:
            self._restore_train_iterate(optimizer)

    def after_load(self, optimizer) -> None:
        self._restore_train_iterate(optimizer)

    @staticmethod
    def _restore_train_iterate(optimizer) -> None:
        with torch.no_grad():
            for p in _params(optimizer):
                y = optimizer.state[p].pop(TRAIN_ITERATE, None)
                if y is not None:
                    p.copy_(y)
        for group in optimizer.param_groups:
            group["train_mode"] = True
