"""Prodigy (prodigyopt), learning-rate-free Adam: lr 1.0 times AdamW's warmup/cosine
schedule, as its README recommends, with decoupled weight decay on the baseline's decay
split, bias correction and safeguard_warmup (the README's advice with a warmup). Betas,
eps and weight decay are the AdamW baseline's; d0 and d_coef stay at Prodigy's defaults.
No constant is tuned per run."""

from __future__ import annotations

from agdlm.optim.kind import OptimiserKind, decay_groups, require


class ProdigyKind(OptimiserKind):
    name, step_name, scheduled = "prodigy", "Prodigy.step", True
    package, extra = "prodigyopt", "baselines"
    default_lr = 1.0
    backends = ("single", "ddp")
    # Measured on 2 gloo ranks (tests/dist_worker.py): on FSDP2 its d numerator after 3 steps is
    # 2.03e-13 against one process's 3.15e-13, a shard's partial sum; prodigyopt's own reduction
    # (fsdp_in_use) all-reduces a CUDA tensor, and ZeRO's flat partitions are partial likewise.
    refusal = "Prodigy's d estimate would sum over this rank's shard only (a partial sum, not the model's)"

    def build(self, model, optim_cfg, device_type):
        prodigyopt = require(self.package, self)
        return prodigyopt.Prodigy(decay_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                                  betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, decouple=True,
                                  use_bias_correction=True, safeguard_warmup=True)

    def log_metrics(self, optimizer) -> dict:
        group = optimizer.param_groups[0]
        # d is Prodigy's step-size estimate; d * lr is the Adam lr it steps with (bias correction aside)
        return {"lr": group["lr"], "prodigy_d": float(group["d"]), "prodigy_d_lr": float(group["d"]) * group["lr"]}
