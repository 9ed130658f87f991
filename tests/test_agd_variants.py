"""AGD study variants (optim.variant) and the non-finite-gradient skip, against references
written here from the formulas in agdlm/optim/variants.py's docstring."""

from __future__ import annotations

import math

import pytest
import torch

from agdlm.optim import AGD
from agdlm.optim.variants import MOMENTUM_BETA
from test_agd_math import backward, batch, eta_ref, grads_of, reference_layers, snapshot, tiny_gpt, updates


def newton_schulz_reference(m: torch.Tensor) -> torch.Tensor:
    """Muon's quintic iteration, written out: X <- aX + b(XX^T)X + c(XX^T)^2 X, 5 times, on
    the wide orientation, starting from X / ||X||_F."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m.double()
    flip = x.shape[0] > x.shape[1]
    x = x.T if flip else x
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        s = x @ x.T
        x = a * x + b * s @ x + c * s @ s @ x
    return x.T if flip else x


EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")


def reference_spectral_step(model, grads, gain=1.0, rows_for_embeddings=False):
    """(eta, G, updates): Frobenius matrix layers step along O = NS([W|b] gradient) with dual
    <g, O>; sign and RMS layers as in the faithful table. rows_for_embeddings (variant
    spectral_momentum_rows): the embeddings and head instead by rows, s = 1/sqrt(d): row v
    along sqrt(d) g_v / ||g_v||, dual sqrt(d) sum_v ||g_v||."""
    layers = reference_layers(model)
    P = dict(model.named_parameters())
    g = {k: v.double() for k, v in grads.items()}
    L = sum(in_L for in_L, _ in layers)
    G, directions = 0.0, {}
    for _, comps in layers:
        for norm, s, names, dim in comps:
            if norm == "frob" and rows_for_embeddings and names[0] in EMBEDDINGS:
                gv = g[names[0]]
                d = gv.shape[1]
                s = 1 / math.sqrt(d)
                row_norms = gv.norm(dim=1, keepdim=True)
                G += s * math.sqrt(d) * float(row_norms.sum())
                directions[names[0]] = (s, math.sqrt(d) * torch.where(row_norms > 0, gv / row_norms, 0.0))
            elif norm == "frob":
                blocks = [g[n] if g[n].dim() == 2 else g[n].view(-1, 1) for n in names]
                m = torch.cat(blocks, 1)
                o = newton_schulz_reference(m)
                G += s * float((m * o).sum())
                col = 0
                for n, blk in zip(names, blocks):
                    directions[n] = (s, o[:, col : col + blk.shape[1]].reshape(P[n].shape))
                    col += blk.shape[1]
            elif norm == "sign":
                G += s * float(g[names[0]].abs().sum())
                directions[names[0]] = (s, torch.sign(g[names[0]]))
            elif norm == "rms":
                nrm = float(g[names[0]].norm())
                G += s * math.sqrt(dim) * nrm
                directions[names[0]] = (s, math.sqrt(dim) * g[names[0]] / nrm)
    G /= L
    eta = eta_ref(G)
    step = gain * eta / L
    return eta, G, {n: -step * s * d for n, (s, d) in directions.items()}


@pytest.mark.parametrize("bias,tied", [(False, True), (True, False)])
def test_spectral_matches_reference_and_inner_product(bias, tied):
    m = tiny_gpt(bias=bias, tied=tied, dtype=torch.float64)
    opt = AGD(m, variant="spectral", gain=0.8)
    opt.init_weights()
    backward(m, *batch())
    g, w0 = grads_of(m), snapshot(m)
    eta = float(opt.step())
    eta_r, G_r, upd_r = reference_spectral_step(m, g, gain=0.8)
    assert eta == pytest.approx(eta_r, rel=1e-5)
    assert float(opt.last_stats["G"]) == pytest.approx(G_r, rel=1e-5)
    upd = updates(m, w0)
    for n in upd:  # NS runs in fp32 inside the optimiser: fp32 tolerance
        torch.testing.assert_close(upd[n], upd_r[n], rtol=2e-4, atol=1e-6, msg=n)
    inner = sum(float((g[n].double() * upd[n]).sum()) for n in upd)
    assert inner == pytest.approx(-0.8 * eta_r * G_r, rel=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_rows_variant_matches_reference_and_moves_each_embedding_row_by_eta_over_L(tied):
    m = tiny_gpt(tied=tied, dtype=torch.float64)
    opt = AGD(m, variant="spectral_momentum_rows", gain=0.8)
    opt.init_weights()
    backward(m, *batch())
    g, w0 = grads_of(m), snapshot(m)
    eta = float(opt.step())  # the first bias-corrected average is the gradient itself
    eta_r, G_r, upd_r = reference_spectral_step(m, g, gain=0.8, rows_for_embeddings=True)
    assert eta == pytest.approx(eta_r, rel=1e-5)
    upd = updates(m, w0)
    for n in upd:
        torch.testing.assert_close(upd[n], upd_r[n], rtol=2e-4, atol=1e-6, msg=n)
    inner = sum(float((g[n].double() * upd[n]).sum()) for n in upd)
    assert inner == pytest.approx(-0.8 * eta_r * G_r, rel=1e-4)
    embeddings = [n for n in upd if n in EMBEDDINGS]
    assert len(embeddings) == (2 if tied else 3)
    for n in embeddings:  # every row with a gradient moves by gain * eta / L in L2, the rest stay
        moved = upd[n].norm(dim=1)
        has_grad = g[n].norm(dim=1) > 0
        assert has_grad.any()
        torch.testing.assert_close(moved[has_grad], torch.full_like(moved[has_grad], 0.8 * eta / opt.L))
        assert not (~has_grad).any() or float(moved[~has_grad].abs().max()) == 0.0


def test_spectral_moves_matrices_by_eta_over_L_times_s_in_spectral_norm():
    m = tiny_gpt(tied=False, dtype=torch.float64)
    opt = AGD(m, variant="spectral")
    opt.init_weights()
    backward(m, *batch())
    w0 = snapshot(m)
    eta = float(opt.step())
    upd = updates(m, w0)
    for _, comps in reference_layers(m):
        for norm, s, names, _ in comps:
            if norm != "frob":
                continue
            top = float(torch.linalg.matrix_norm(upd[names[0]], ord=2))
            # NS5 leaves singular values in about [0.7, 1.2] (Muon's coefficients trade exactness for speed)
            assert 0.6 * eta / opt.L * s < top < 1.3 * eta / opt.L * s, names[0]


def test_momentum_uses_the_bias_corrected_average():
    m = tiny_gpt(dtype=torch.float64)
    opt = AGD(m, variant="momentum")
    opt.init_weights()
    avg = None
    for k in range(3):
        backward(m, *batch(seed=10 + k))
        g, w0 = grads_of(m), snapshot(m)
        avg = {n: v.clone() * (1 - MOMENTUM_BETA) for n, v in g.items()} if avg is None else \
            {n: MOMENTUM_BETA * avg[n] + (1 - MOMENTUM_BETA) * g[n] for n in g}
        corrected = {n: v / (1 - MOMENTUM_BETA ** (k + 1)) for n, v in avg.items()}
        opt.step()
        from test_agd_math import reference_step

        eta_r, G_r, upd_r, _ = reference_step(reference_layers(m), corrected)
        assert float(opt.last_stats["G"]) == pytest.approx(G_r, rel=1e-10)
        upd = updates(m, w0)
        for n in upd:
            torch.testing.assert_close(upd[n], upd_r[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("variant", ["momentum", "spectral_momentum"])
def test_momentum_state_round_trips(variant):
    def run(split):
        m = tiny_gpt()
        opt = AGD(m, variant=variant)
        opt.init_weights()
        for k in range(4):
            if k == split:
                state, weights = opt.state_dict(), {k: v.clone() for k, v in m.state_dict().items()}
                m = tiny_gpt(seed=5)
                m.load_state_dict(weights)
                opt = AGD(m, variant=variant)
                opt.load_state_dict(state)
            backward(m, *batch(seed=20 + k))
            opt.step()
        return snapshot(m)

    a, b = run(split=None), run(split=2)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_variant_mismatch_refused_on_load():
    m = tiny_gpt()
    state = AGD(m, variant="momentum").state_dict()
    with pytest.raises(ValueError, match="variant"):
        AGD(m).load_state_dict(state)


class FlatHalves:
    """A binding shaped like DeepSpeed's: ONE flat gradient storage for all parameters (its
    own key), each parameter cut into two pieces at an arbitrary (mid-row) point. Real
    buffers, identity reduce: it checks the momentum plumbing of the sharded path (buffers
    mirror the storage, pieces view the averages) against the local binding."""

    def __init__(self, params):
        self.params = params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.key = torch.zeros(n, dtype=params[0].dtype)  # the state key, like a flat partition
        self.flat_grad = torch.zeros(n, dtype=params[0].dtype)

    def load_grads(self):
        for p, o in zip(self.params, self.offsets):
            self.flat_grad[o : o + p.numel()].copy_(p.grad.view(-1))

    def grad_storages(self):
        return [(self.key, self.flat_grad)]

    def pieces(self, index, grads=None):
        p, o = self.params[index], self.offsets[index]
        g = (self.flat_grad if grads is None else grads[0])[o : o + p.numel()]
        cut = p.numel() // 3 + 1
        w = p.detach().view(-1)
        return [(0, w[:cut], g[:cut]), (cut, w[cut:], g[cut:])]

    def reduce(self, vec):
        return vec


@pytest.mark.parametrize("variant", ["momentum", "spectral_momentum", "spectral_momentum_rows"])
def test_momentum_on_a_flat_sharded_style_binding_equals_the_local_one(variant):
    def run(flat: bool):
        m = tiny_gpt(dtype=torch.float64)
        opt = AGD(m, variant=variant)
        opt.init_weights(torch.Generator().manual_seed(0))
        if flat:
            binding = FlatHalves(opt.params)
            opt.bind(binding)
            assert set(opt.state[binding.key]) == {"momentum", "momentum_steps"}  # made at bind
        for k in range(3):
            backward(m, *batch(seed=40 + k))
            if flat:
                binding.load_grads()
            opt.step()
        return snapshot(m), opt

    (a, local), (b, flat) = run(False), run(True)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-12, atol=1e-14, msg=n)
    key = next(iter(flat.state))
    buffers = torch.cat([local.state[p]["momentum"].view(-1) for p in local.params])
    torch.testing.assert_close(flat.state[key]["momentum"], buffers, rtol=1e-12, atol=1e-15)
    assert float(flat.state[key]["momentum_steps"]) == 3


def test_an_all_zero_gradient_step_leaves_momentum_alone():
    # DeepSpeed and DCP initialise optimiser state with a step on zero gradients: not counted
    m = tiny_gpt(dtype=torch.float64)
    opt = AGD(m, variant="momentum")
    opt.init_weights()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    w = snapshot(m)
    opt.step()
    assert all(float(opt.state[p]["momentum_steps"]) == 0 for p in opt.params)
    assert all(torch.equal(w[n], v) for n, v in snapshot(m).items())


@pytest.mark.parametrize("policy", ["default", "agd_exp", "modular"])
@pytest.mark.parametrize("variant", ["none", "momentum", "spectral", "spectral_momentum_rows"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_skips_the_step(policy, variant, bad):
    m = tiny_gpt(bias=True, tied=policy != "modular")
    opt = AGD(m, policy=policy, variant=variant)
    opt.init_weights()
    backward(m, *batch())
    opt.step()  # one good step first (momentum has a history)
    backward(m, *batch(seed=3))
    m.transformer.h[0].mlp.c_fc.weight.grad[1, 2] = bad
    before = snapshot(m)
    eta = opt.step()
    after = snapshot(m)
    for n in before:
        assert torch.equal(before[n], after[n]), n
    assert float(eta) == 0.0
    assert int(opt.consecutive_skips) == 1 and int(opt.skipped_steps) == 1
    assert opt.log_metrics()["agd_skipped_steps"] == 1
    backward(m, *batch(seed=4))
    m.transformer.wpe.weight.grad[0, 0] = bad
    opt.step()
    assert int(opt.consecutive_skips) == 2
    backward(m, *batch(seed=5))
    opt.step()  # a good step moves again and resets the run of skips
    assert int(opt.consecutive_skips) == 0 and int(opt.skipped_steps) == 2
    assert any(not torch.equal(after[n], p) for n, p in m.named_parameters())
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_weight_ratio_metric_against_initial_norms():
    m = tiny_gpt()
    opt = AGD(m)
    opt.init_weights()
    w0 = snapshot(m)
    for k in range(3):
        backward(m, *batch(seed=30 + k))
        opt.step()
    out = opt.log_metrics()
    fc = [n for n in w0 if n.endswith("mlp.c_fc.weight")]
    want = sum(float(dict(m.named_parameters())[n].norm() / w0[n].norm()) for n in fc) / len(fc)
    assert out["agd_weight_ratio/mlp_fc"] == pytest.approx(want, rel=1e-6)


def test_every_variant_is_accepted_on_every_backend():
    from agdlm.config import load_config

    for backend in ("single", "ddp", "fsdp2", "deepspeed"):
        for variant in ("momentum", "spectral", "spectral_momentum"):
            assert load_config(None, [f"optim.variant={variant}", f"parallel.backend={backend}"]).optim.variant == variant


def test_agd_fp16_on_deepspeed_is_refused_before_any_engine():
    from agdlm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.precision=fp16 with optim.name=agd on parallel.backend=deepspeed"):
        load_config(None, ["train.precision=fp16", "parallel.backend=deepspeed"])
    load_config(None, ["train.precision=fp16", "parallel.backend=deepspeed", "optim.name=adamw"])


def test_agd_auto_precision_resolving_to_fp16_on_deepspeed_is_refused_before_any_engine():
    # precision=auto picks fp16 on a GPU without bf16: known when the backend is made, before
    # deepspeed.initialize (DeepSpeedBackend.__init__ calls this with the resolved precision)
    from agdlm.config import ConfigError, load_config
    from agdlm.parallel.deepspeed import check_agd_precision

    cfg = load_config(None, ["parallel.backend=deepspeed"])
    with pytest.raises(ConfigError, match="train.precision=auto resolves to fp16 on this GPU"):
        check_agd_precision(cfg, "fp16")
    for precision in ("bf16", "fp32"):
        check_agd_precision(cfg, precision)
    check_agd_precision(load_config(None, ["parallel.backend=deepspeed", "optim.name=adamw"]), "fp16")


def test_bf16_newton_schulz_direction_matches_fp32_per_matrix():
    """The accelerator path (bf16 Newton-Schulz, same shapes stacked, Polar Express's 1.02
    safety factor) against the fp32 one, per matrix: random matrices of several shapes (two
    of each, so they are stacked) and the real gradients of a tiny GPT."""
    from agdlm.optim.variants import orthogonalise_many

    gen = torch.Generator().manual_seed(0)
    random = [torch.randn(shape, generator=gen) for shape in [(64, 192), (64, 192), (192, 64), (50, 50), (50, 50), (7, 130)]]
    m = tiny_gpt()
    backward(m, *batch(seed=3))
    grads = [p.grad.clone() for p in m.parameters() if p.grad is not None and p.dim() == 2]
    for ms in (random, grads):
        fp32 = orthogonalise_many(ms, torch.float32)
        bf16 = orthogonalise_many(ms, torch.bfloat16)
        for a, b in zip(fp32, bf16):
            assert b.dtype == torch.float32 and torch.isfinite(b).all()
            cos = float((a * b).sum() / (a.norm() * b.norm()))
            assert cos >= 0.99, (tuple(a.shape), cos)
            assert torch.linalg.matrix_norm(b, ord=2) < 1.3  # still a (near-)orthogonal direction


def test_stacked_newton_schulz_equals_one_at_a_time():
    from agdlm.optim.variants import orthogonalise, orthogonalise_many

    gen = torch.Generator().manual_seed(1)
    ms = [torch.randn(40, 24, generator=gen) for _ in range(3)] + [torch.randn(24, 40, generator=gen)]
    for stacked, m in zip(orthogonalise_many(ms, torch.float32), ms):
        torch.testing.assert_close(stacked, orthogonalise(m), rtol=1e-5, atol=1e-6)
