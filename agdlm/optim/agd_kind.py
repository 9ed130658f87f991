"""AGD as the trainer and the backends see it (the algorithm itself is agd.py): no lr or
schedule, its own init, no clipping, steps it skips for a non-finite G."""

from __future__ import annotations

from agdlm.optim.agd import AGD
from agdlm.optim.kind import OptimiserKind, OptimiserRefused
from agdlm.optim.variants import uses_momentum


class AGDKind(OptimiserKind):
    name, step_name, reads_every_gradient, compiles_step = "agd", "AGD.step", True, True

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.train.precision == "fp16" and cfg.parallel.backend == "deepspeed":
            raise OptimiserRefused("train.precision=fp16 with optim.name=agd on parallel.backend=deepspeed: DeepSpeed's "
                                   "fp16 optimiser accumulates and reduces gradients in fp16, and AGD's norms need fp32; "
                                   "use bf16 or fp32")

    def build(self, model, optim_cfg, device_type):
        return AGD(model, policy=optim_cfg.policy, gain=optim_cfg.gain, variant=optim_cfg.variant,
                   compile=optim_cfg.compile)

    def log_metrics(self, optimizer) -> dict:
        return optimizer.log_metrics()

    def consecutive_skips(self, optimizer):
        return optimizer.consecutive_skips

    def initialises_weights(self, optim_cfg) -> bool:
        return optim_cfg.init != "keep"

    def init_weights(self, model, optim_cfg) -> None:
        if self.initialises_weights(optim_cfg):
            AGD(model, policy=optim_cfg.policy, gain=optim_cfg.gain).init_weights()

    def shards_state(self, optim_cfg) -> bool:
        return uses_momentum(optim_cfg.variant)  # the faithful AGD has no per-parameter state
