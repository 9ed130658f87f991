"""One small module per backend. `build_backend(cfg, env)` picks it by parallel.backend;
each answers: wrap the model, bind the optimiser, back-propagate, step, save and load."""

from __future__ import annotations

import importlib

from agdlm.parallel.env import DistEnv, init_distributed, shutdown_distributed

BACKENDS = {
    "single": "agdlm.parallel.single:SingleBackend",
    "ddp": "agdlm.parallel.ddp:DDPBackend",
    "fsdp2": "agdlm.parallel.fsdp2:FSDP2Backend",
    "deepspeed": "agdlm.parallel.deepspeed:DeepSpeedBackend",
}

# What each backend writes inside checkpoints/step_N/: a resume needs the same layout, and
# `agdlm export` reads any of them.
CHECKPOINT_LAYOUT = {"single": "model.pt", "ddp": "model.pt", "fsdp2": "dcp", "deepspeed": "deepspeed"}


def build_backend(cfg, env: DistEnv):
    module_name, class_name = BACKENDS[cfg.parallel.backend].split(":")
    return getattr(importlib.import_module(module_name), class_name)(cfg, env)


__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "build_backend", "BACKENDS", "CHECKPOINT_LAYOUT"]
