"""AGD study variants (issue: the AGD study): each changes one thing about the faithful rule
table, with constants declared here once and never tuned per run.

- `momentum`: the gradient is replaced by its bias-corrected exponential average with
  beta = MOMENTUM_BETA (the universal 0.95 of Muon, Dion and modula). Norms, G and the
  directions are all taken of the average. Hypothesis H4 (no averaging over steps).
- `spectral`: every Frobenius *matrix* component (a weight, a fused c_attn, a [W|b] pair, an
  embedding) steps along the orthogonalised gradient O ~ U V^T (Newton-Schulz, the quintic
  coefficients published with Muon, NS_STEPS iterations) instead of g / ||g||_F. O has
  spectral norm ~1, so each matrix moves by gain * (eta/L) * s in the spectral norm that
  AGD's perturbation bound is about, and its dual term in G is <g, O> (~ the nuclear
  norm). Hypothesis H2 (Frobenius under-stepping).
- `spectral_momentum`: both.

Both keep sum_l <g_l, dW_l> = -gain * eta * G exactly (with g the averaged gradient under
momentum). `spectral` needs each matrix whole: on a sharded binding (FSDP2, DeepSpeed ZeRO)
the matrices are assembled by one all-reduce of all matrix gradients per step (every rank
writes only what it holds), which costs the traffic and the memory of a full gradient; each
rank then updates its own pieces. The momentum variants keep buffers per logical parameter
(optimiser state) and run with the local binding only (single process, DDP); on sharded
bindings they are refused (sharded AGD state is not built).
"""

from __future__ import annotations

import torch

VARIANTS = ("none", "momentum", "spectral", "spectral_momentum")
MOMENTUM_BETA = 0.95
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic (Jordan et al. 2024)
NS_STEPS = 5


def uses_momentum(variant: str) -> bool:
    return variant in ("momentum", "spectral_momentum")


def uses_spectral(variant: str) -> bool:
    return variant in ("spectral", "spectral_momentum")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"AGD variant={variant!r} is unknown (choose one of: {', '.join(VARIANTS)})")


def orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for m = U S V^T (fp32; m of any shape d_out x d_in).
    Normalised by the Frobenius norm first so every singular value starts in (0, 1]."""
    x = m.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the small Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MomentumGrads:
    """Bias-corrected EMA of each parameter's gradient, kept in the optimiser's `state`
    (so it is checkpointed with the optimiser). `average()` gives this step's averages;
    `commit(finite)` keeps them only if the step was taken, so one non-finite gradient
    never poisons the buffers (no host sync: a `torch.where`)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer  # its `state` is replaced by load_state_dict: look it up each step
        self._pending: list[tuple[dict, torch.Tensor]] = []

    def average(self) -> list[torch.Tensor | None]:
        out, self._pending = [], []
        for p in self.optimizer.params:
            if p.grad is None:
                out.append(None)
                continue
            st = self.optimizer.state[p]
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["momentum_steps"] = torch.zeros((), dtype=torch.float64, device=p.device)
            new = st["momentum"].lerp(p.grad, 1 - MOMENTUM_BETA)
            correction = 1 - MOMENTUM_BETA ** (st["momentum_steps"].double() + 1)
            self._pending.append((st, new))
            out.append(new / correction.to(p.dtype))
        return out

    def commit(self, finite: torch.Tensor) -> None:
        for st, new in self._pending:
            st["momentum"].copy_(torch.where(finite, new, st["momentum"]))
            st["momentum_steps"].add_(finite.to(st["momentum_steps"].dtype))
        self._pending = []


class AveragedGradBinding:
    """The local binding with each gradient replaced by a given tensor (its average)."""

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor | None]):
        self.params, self.grads = params, grads

    def pieces(self, index: int):
        g = self.grads[index]
        return [(0, self.params[index].detach().view(-1), None if g is None else g.view(-1))]

    def reduce(self, vec: torch.Tensor) -> torch.Tensor:
        return vec
