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
- `spectral_momentum_rows` (issue 19, declared before it ran): `spectral_momentum` for every
  matrix except the embeddings and the head (the tied wte/lm_head, an untied head, wpe),
  which step by AGD's rows rule instead: row v along sqrt(d) g_v / ||g_v||_2, dual
  sqrt(d) sum_v ||g_v||_2, with s = ROWS_S_TIMES_SQRT_D / sqrt(d), so each row of L2 norm ~1
  (the default init's rows, orthogonal times sqrt(V/d)) moves by gain * eta/L: the same
  relative step the spectral rule gives a matrix in its spectral norm. Row-local, so shard-
  local on FSDP2's Shard(0), and no Newton-Schulz on the 50,304-row matrix (a quarter of
  the CPU step at GPT-2-124M shapes, `agdlm bench optim --variant spectral_momentum`). No
  anchor orthogonalises embeddings or the head; Scion normalises embedding rows.

Both keep sum_l <g_l, dW_l> = -gain * eta * G exactly (with g the averaged gradient under
momentum). `spectral` needs each matrix whole: on a sharded binding (FSDP2, HSDP within its
shard group, DeepSpeed ZeRO 1/2/3) each matrix is orthogonalised once, by one owner rank
(agdlm.parallel.owners: one all-to-all sends every rank's pieces to the owners, a second
returns each rank its own elements of O; 2(N-1)/N^2 of the matrices per rank), and each
rank's <g, O> terms ride in the step's one all-reduce. The momentum buffers mirror the binding's gradient
storage (`grad_storages()`): one per parameter on the local binding, this rank's shard as a
DTensor of the parameter's placement on FSDP2 (checkpointed through DCP), one buffer the size
of the fp32 flat partition on DeepSpeed ZeRO 1/2/3 (checkpointed by the engine with the
optimiser's state): elementwise, so every rank averages exactly its own gradient elements and
no collective is added.
"""

from __future__ import annotations

import torch

VARIANTS = ("none", "momentum", "spectral", "spectral_momentum", "spectral_momentum_rows")
EMBEDDING_ROLES = ("wte_head", "wte", "head", "wpe", "embedding")
ROWS_S_TIMES_SQRT_D = 1.0  # rows variant: s = 1/sqrt(d), a row of L2 norm 1 moves by eta/L
MOMENTUM_BETA = 0.95
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic (Jordan et al. 2024)
NS_STEPS = 5


def uses_momentum(variant: str) -> bool:
    return variant in ("momentum", "spectral_momentum", "spectral_momentum_rows")


def uses_spectral(variant: str) -> bool:
    return variant in ("spectral", "spectral_momentum", "spectral_momentum_rows")


def uses_rows_for_embeddings(variant: str) -> bool:
    return variant == "spectral_momentum_rows"


def variant_plan(plan, variant: str):
    """The policy's plan with the variant's rule changes (the init stays the policy's)."""
    if not uses_rows_for_embeddings(variant):
        return plan
    import dataclasses
    import math

    components = []
    for c in plan.components:
        if c.role in EMBEDDING_ROLES and c.norm == "frobenius" and len(c.parts) == 1 and len(c.parts[0].shape) == 2:
            d = c.parts[0].shape[1]
            c = dataclasses.replace(c, norm="rows", s=ROWS_S_TIMES_SQRT_D / math.sqrt(d), dim=d)
        components.append(c)
    return dataclasses.replace(plan, components=components)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"AGD variant={variant!r} is unknown (choose one of: {', '.join(VARIANTS)})")


def orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for m = U S V^T (fp32; m of any shape d_out x d_in).
    Normalised by the Frobenius norm first so every singular value starts in (0, 1]."""
    return orthogonalise_many([m], torch.float32)[0]


BF16_SAFETY = 1.02  # Polar Express: ||X||_F (1 + 2e-2), so bf16 rounding cannot lift a singular value past 1


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (tensor cores; fp32 matmul there runs at a fraction of the rate,
    as Muon and Dion run it); fp32 on the CPU, where bf16 matmul is slower (measured 6.6x at
    64 x 64 on this project's 2-core machines)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def orthogonalise_many(ms: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """orthogonalise for several matrices, same-shape ones stacked into one batched matmul per
    iteration; returned in fp32. In bf16 the matmuls accumulate in fp32 (as tensor cores do)
    and the start is normalised with BF16_SAFETY; fp32 keeps the plain Frobenius start."""
    out: list[torch.Tensor | None] = [None] * len(ms)
    by_shape: dict[tuple, list[int]] = {}  # wide orientation (a tall matrix transposed): more share a shape
    for i, m in enumerate(ms):
        by_shape.setdefault((min(m.shape), max(m.shape)), []).append(i)
    a, b, c = NS_COEFFICIENTS
    for shape, idx in by_shape.items():
        wide = [ms[i].float() if ms[i].shape[0] <= ms[i].shape[1] else ms[i].float().T for i in idx]
        x = torch.stack(wide) if len(idx) > 1 else wide[0].unsqueeze(0)
        norm = x.flatten(1).norm(dim=1)[:, None, None]
        x = x / (norm * BF16_SAFETY + 1e-7) if dtype == torch.bfloat16 else x / (norm + 1e-7)
        x = x.to(dtype)
        for _ in range(NS_STEPS):
            gram = x @ x.transpose(1, 2)
            x = torch.baddbmm(x, b * gram + c * gram @ gram, x, beta=a)  # a x + (b G + c G^2) x: one new x
        x = x.float()
        for k, i in enumerate(idx):
            out[i] = x[k] if ms[i].shape[0] <= ms[i].shape[1] else x[k].T
    return out  # type: ignore[return-value]


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's elements of a DTensor (the tensor itself otherwise)."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class MomentumGrads:
    """Bias-corrected EMA of the gradient, one buffer per gradient storage of the binding,
    kept in the optimiser's `state` under the storage's key (so each backend checkpoints it
    with the optimiser). `average(storages)` gives this step's averages (written over the
    gradients in place: they are not read after the step); `commit(take)` keeps them only if
    the step was taken, so one non-finite gradient never poisons the buffers (no host sync:
    a `torch.where`). A step whose gradients are all zero (G = 0: DeepSpeed's and DCP's
    state-initialising steps) is not counted either."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer  # its `state` is replaced by load_state_dict: look it up each step
        self._pending: list[tuple[dict, torch.Tensor]] = []

    def ensure_state(self, keys: list[torch.Tensor]) -> None:
        """Create the buffers up front (zeros like the key: a DTensor key gives a DTensor of its
        placement), so a checkpoint template sees them before the first step."""
        for key in keys:
            st = self.optimizer.state[key]
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(key.detach(), memory_format=torch.contiguous_format)
                st["momentum_steps"] = torch.zeros((), dtype=torch.float64, device=local_part(key).device)

    def average(self, storages: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor | None]:
        self.ensure_state([key for key, g in storages if g is not None])
        out, self._pending = [], []
        for key, g in storages:
            if g is None:
                out.append(None)
                continue
            st = self.optimizer.state[key]
            m = local_part(st["momentum"]).view_as(g)
            torch.lerp(m, g, 1 - MOMENTUM_BETA, out=g)  # the new average, over the gradient (m's lerp, bit for bit)
            steps = st["momentum_steps"].double()  # load_state_dict casts it to the parameter's dtype
            correction = 1 - MOMENTUM_BETA ** (steps + 1)
            self._pending.append((st, g))
            out.append(g / correction.to(g.dtype))
        return out

    def commit(self, take: torch.Tensor) -> None:
        for st, new in self._pending:
            m = local_part(st["momentum"])
            m.copy_(torch.where(take, new.view_as(m), m))
            st["momentum_steps"].add_(take.to(st["momentum_steps"].dtype))
        self._pending = []
