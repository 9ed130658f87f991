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


def build_backend(cfg, env: DistEnv):
    module_name, class_name = BACKENDS[cfg.parallel.backend].split(":")
    return getattr(importlib.import_module(module_name), class_name)(cfg, env)


__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "build_backend", "BACKENDS"]
