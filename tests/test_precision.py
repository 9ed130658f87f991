"""Mixed-precision numerics of the shared backend step: bf16 autocast keeps fp32
gradients; fp16 loss scaling is undone before the optimiser sees the gradients, and a step
with non-finite gradients is skipped and reported."""

import pytest
import torch

from agdlm.config import load_config
from agdlm.model import GPT
from agdlm.parallel import build_backend
from agdlm.parallel.env import DistEnv

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def backend_for(tiny_overrides, *extra, optimizer="agd"):
    cfg = load_config(None, tiny_overrides + list(extra))
    torch.manual_seed(0)
    backend = build_backend(cfg, ENV)
    if optimizer == "agd":
        from agdlm.optim import AGD

        backend.setup(GPT(cfg.model), lambda m: AGD(m))
    else:
        backend.setup(GPT(cfg.model), lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    return backend


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50257, (4, 32), generator=g), torch.randint(0, 50257, (4, 32), generator=g)


def test_bf16_autocast_keeps_fp32_gradients(tiny_overrides):
    backend = backend_for(tiny_overrides, "train.precision=bf16", optimizer="sgd")
    assert backend.precision == "bf16"
    backend.forward_backward(*batch(), accum_steps=1, is_last=True)
    for name, p in backend.raw_model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("optimizer", ["sgd", "agd"])
def test_loss_scale_is_removed_before_the_step(tiny_overrides, optimizer):
    plain = backend_for(tiny_overrides, optimizer=optimizer)
    scaled = backend_for(tiny_overrides, optimizer=optimizer)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for b in (plain, scaled):
        b.forward_backward(*batch(), accum_steps=1, is_last=True)
        stats = b.optimizer_step(grad_clip=0.0)
    assert stats["skipped_step"] is False
    for (name, a), (_, c) in zip(plain.raw_model.named_parameters(), scaled.raw_model.named_parameters()):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6), name


def test_non_finite_gradients_skip_the_step(tiny_overrides):
    backend = backend_for(tiny_overrides)
    backend.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = {n: p.detach().clone() for n, p in backend.raw_model.named_parameters()}
    backend.forward_backward(*batch(), accum_steps=1, is_last=True)
    next(backend.raw_model.parameters()).grad[0, 0] = float("inf")
    stats = backend.optimizer_step(grad_clip=0.0)
    assert stats["skipped_step"] is True
    for n, p in backend.raw_model.named_parameters():
        assert torch.equal(p, before[n]), n
