"""AGD's step against an independent implementation of AGD_SPEC.md sections 2-3 written
here from the formulas (tensor names are used only in the test, never by the optimiser)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from agdlm.model import GPT, GPTConfig
from agdlm.optim import AGD
from agdlm.optim import agd as agd_module

pytestmark = pytest.mark.usefixtures("small_piece_path")  # every check on both update paths (conftest)

V, T, D = 64, 8, 16


def tiny_gpt(bias=False, tied=True, n_layer=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=D, block_size=T, vocab_size=V, bias=bias,
                      tie_embeddings=tied)).to(dtype)
    return m


def batch(seed=1, b=4, vocab=V):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, T), generator=g)
    y = torch.randint(0, vocab, (b, T), generator=g)
    return x, y


def backward(model, x, y, scale=1.0):
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    (loss * scale).backward()
    return loss


def eta_ref(G: float) -> float:
    return math.log((1 + math.sqrt(1 + 4 * G)) / 2)


# ---- the independent reference (spec section 3, `default`) ---------------------------------

def reference_layers(model: GPT):
    """[(in_L, [(norm, s, [tensor names], dim)])] written from the spec's default table."""
    cfg = model.config
    n, d, vocab, block = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size
    P = dict(model.named_parameters())
    layers = []

    def mat(wname, s, in_L):
        bname = wname[: -len("weight")] + "bias"
        names = [wname]
        if bname in P:
            names.append(bname)
            s = s * math.sqrt(P[wname].shape[1] / (P[wname].shape[1] + 1))
        layers.append((in_L, [("frob", s, names, None)]))

    def ln(prefix):
        comps = [("sign", 1.0, [prefix + ".weight"], None)]
        if prefix + ".bias" in P:
            comps.append(("rms", 1.0, [prefix + ".bias"], d))
        layers.append((1, comps))

    mat("transformer.wte.weight", math.sqrt(vocab / d), 1)
    if "lm_head.weight" in P:
        mat("lm_head.weight", math.sqrt(vocab / d), 1)
    mat("transformer.wpe.weight", math.sqrt(block / d), 1)
    for i in range(n):
        h = f"transformer.h.{i}."
        mat(h + "attn.c_attn.weight", 1.0, 3)
        mat(h + "attn.c_proj.weight", 1 / math.sqrt(n), 1)
        mat(h + "mlp.c_fc.weight", 2.0, 1)
        mat(h + "mlp.c_proj.weight", math.sqrt(1 / 4) / math.sqrt(n), 1)
        ln(h + "ln_1")
        ln(h + "ln_2")
    ln("transformer.ln_f")
    covered = {nm for _, comps in layers for c in comps for nm in c[2]}
    assert covered == set(P), set(P) ^ covered
    return layers


def reference_step(layers, grads: dict, gain=1.0):
    """(eta, G, {name: update}) in float64 from the formulas of spec section 2."""
    g = {k: v.double() for k, v in grads.items()}
    L = sum(in_L for in_L, _ in layers)
    G = 0.0
    for _, comps in layers:
        for norm, s, names, dim in comps:
            if norm == "frob":
                G += s * math.sqrt(sum(float((g[nm] ** 2).sum()) for nm in names))
            elif norm == "sign":
                G += s * float(g[names[0]].abs().sum())
            elif norm == "rms":
                G += s * math.sqrt(dim) * float(g[names[0]].norm())
    G /= L
    eta = eta_ref(G)
    step = gain * eta / L
    upd = {}
    for _, comps in layers:
        for norm, s, names, dim in comps:
            if norm == "frob":
                nrm = math.sqrt(sum(float((g[nm] ** 2).sum()) for nm in names))
                for nm in names:
                    upd[nm] = -step * s * g[nm] / nrm if nrm > 0 else torch.zeros_like(g[nm])
            elif norm == "sign":
                upd[names[0]] = -step * s * torch.sign(g[names[0]])
            elif norm == "rms":
                nrm = float(g[names[0]].norm())
                upd[names[0]] = -step * s * math.sqrt(dim) * g[names[0]] / nrm if nrm > 0 else 0 * g[names[0]]
    return eta, G, upd, L


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def restore(model, snap):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(snap[n])


def grads_of(model):
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


def updates(model, before):
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters()}


# ---- tests -----------------------------------------------------------------------------------

def test_eta_reference_values():
    from agdlm.optim import eta_from_G

    for G, want in [(0.0, 0.0), (0.75, 0.405465), (2.0, math.log(2)), (6.0, math.log(3)), (12.0, math.log(4))]:
        eta = float(eta_from_G(torch.tensor(G, dtype=torch.float64)))
        assert eta == pytest.approx(want, abs=1e-6)
        assert math.exp(eta) * (math.exp(eta) - 1) == pytest.approx(G, abs=1e-9)


@pytest.mark.parametrize("bias,tied", [(False, True), (True, False), (True, True)])
def test_default_matches_reference(bias, tied):
    m = tiny_gpt(bias=bias, tied=tied, dtype=torch.float64)
    opt = AGD(m, gain=0.7)
    opt.init_weights()
    backward(m, *batch())
    g, w0 = grads_of(m), snapshot(m)
    eta = opt.step()
    assert eta.dim() == 0
    eta_r, G_r, upd_r, L = reference_step(reference_layers(m), g, gain=0.7)
    assert opt.L == L
    assert float(eta) == pytest.approx(eta_r, rel=1e-12)
    assert float(opt.last_stats["G"]) == pytest.approx(G_r, rel=1e-12)
    assert float(opt.last_stats["contributions"].sum()) == pytest.approx(G_r, rel=1e-12)
    upd = updates(m, w0)
    for n in upd:
        torch.testing.assert_close(upd[n], upd_r[n], rtol=1e-9, atol=1e-12, msg=n)
    # sum_l <g_l, dW_l> = -gain * eta * G
    inner = sum(float((g[n].double() * upd[n]).sum()) for n in upd)
    assert inner == pytest.approx(-0.7 * eta_r * G_r, rel=1e-10)


def test_frobenius_layer_sizes_and_directions_float32():
    m = tiny_gpt(bias=True, tied=False)
    opt = AGD(m)
    opt.init_weights()
    backward(m, *batch())
    g, w0 = grads_of(m), snapshot(m)
    eta = float(opt.step())
    upd = updates(m, w0)
    L = sum(in_L for in_L, _ in reference_layers(m))
    for _, comps in reference_layers(m):
        for norm, s, names, _ in comps:
            if norm != "frob":
                continue
            dw = torch.cat([upd[n].reshape(-1) for n in names])  # [W|b] as one layer
            gg = torch.cat([g[n].reshape(-1) for n in names])
            assert float(dw.norm()) == pytest.approx(eta / L * s, rel=1e-5), names
            cos = float(torch.dot(dw, -gg) / (dw.norm() * gg.norm()))
            assert cos == pytest.approx(1.0, abs=1e-5), names


def test_loss_scaling_keeps_directions():
    m = tiny_gpt(bias=True, dtype=torch.float64)
    AGD(m).init_weights()
    x, y = batch()
    w_init = snapshot(m)
    res = {}
    for c in (1.0, 3.0):
        restore(m, w_init)
        opt = AGD(m)
        backward(m, x, y, scale=c)
        w0 = snapshot(m)
        eta = float(opt.step())
        res[c] = (eta, float(opt.last_stats["G"]), updates(m, w0))
    (e1, G1, u1), (e3, G3, u3) = res[1.0], res[3.0]
    # (the model's cross-entropy runs in fp32, so "exact" here means ~1e-8)
    assert G3 == pytest.approx(3 * G1, rel=1e-7)
    assert e3 == pytest.approx(eta_ref(3 * G1), rel=1e-7)
    for n in u1:
        a, b = u1[n].reshape(-1), u3[n].reshape(-1)
        if a.norm() > 0:
            torch.testing.assert_close(a / a.norm(), b / b.norm(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("set_to_none", [False, True])
def test_zero_gradient_zero_update_finite_eta(set_to_none):
    m = tiny_gpt(bias=True, tied=False)
    opt = AGD(m)
    backward(m, *batch())
    opt.zero_grad(set_to_none=set_to_none)
    w0 = snapshot(m)
    eta = opt.step()
    assert torch.isfinite(eta) and float(eta) == 0.0
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), w0[n]), n
    assert all(math.isfinite(v) for v in opt.log_metrics().values())


def test_partial_zero_gradient_and_none_grad():
    m = tiny_gpt(bias=True)
    opt = AGD(m)
    backward(m, *batch())
    m.transformer.h[0].mlp.c_fc.weight.grad = None  # treated as a zero gradient
    m.transformer.h[0].mlp.c_fc.bias.grad = None
    w0 = snapshot(m)
    eta = opt.step()
    assert torch.isfinite(eta) and float(eta) > 0
    assert torch.equal(m.transformer.h[0].mlp.c_fc.weight.detach(), w0["transformer.h.0.mlp.c_fc.weight"])
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_sign_gains():
    m = tiny_gpt(bias=True)
    opt = AGD(m, gain=1.3)
    backward(m, *batch())
    gamma = m.transformer.h[1].ln_2.weight
    gamma.grad[:3] = 0.0
    g, w0 = gamma.grad.clone(), gamma.detach().clone()
    eta = float(opt.step())
    L = sum(in_L for in_L, _ in reference_layers(m))
    d = (gamma.detach() - w0).abs()
    nz = g != 0
    torch.testing.assert_close(d[nz], torch.full_like(d[nz], 1.3 * eta / L), rtol=1e-5, atol=0)
    assert torch.all(d[~nz] == 0)


def test_accumulation_split_gives_same_update():
    x, y = batch(b=8)
    m = tiny_gpt(bias=True, dtype=torch.float64)
    AGD(m).init_weights()
    w_init = snapshot(m)
    opt = AGD(m)
    backward(m, x, y)
    opt.step()
    w_full = snapshot(m)
    restore(m, w_init)
    m.zero_grad(set_to_none=True)
    for k in range(2):  # two accumulation steps, averaged losses
        _, loss = m(x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4])
        (loss / 2).backward()
    opt.step()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), w_full[n], rtol=1e-10, atol=1e-12, msg=n)


class TwoRankBinding:
    """Rank r holds one flat piece of every tensor: [0, cut) or [cut, n). Cuts fall mid-row;
    some tensors are held entirely by one rank (the other holds an empty piece). The two
    ranks run in threads and `reduce` sums their vectors."""


    def __init__(self, opt, rank, cuts, barrier, box):
        self.opt, self.rank, self.cuts, self.barrier, self.box = opt, rank, cuts, barrier, box

    def pieces(self, i):
        p = self.opt.params[i]
        w, g = p.detach().view(-1), p.grad.view(-1) if p.grad is not None else None
        c = self.cuts[i]
        sl = slice(0, c) if self.rank == 0 else slice(c, p.numel())
        return [(sl.start, w[sl], None if g is None else g[sl])]

    def reduce(self, vec):
        self.box[self.rank] = vec.clone()
        self.barrier.wait()
        out = self.box[0] + self.box[1]
        self.barrier.wait()
        return out


@pytest.mark.parametrize("policy,bias,tied", [("default", True, False), ("modular", True, False),
                                              ("modular", True, True), ("agd_exp", True, True)])
def test_two_piece_binding_equals_single_piece(policy, bias, tied):
    import warnings

    warnings.simplefilter("ignore")
    x, y = batch(b=4, vocab=12)  # few token rows: the rows rule sees empty rows too
    m = tiny_gpt(bias=bias, tied=tied)
    AGD(m, policy=policy).init_weights()
    w_init = snapshot(m)
    ref = AGD(m, policy=policy)
    backward(m, x, y)
    eta_ref_ = ref.step()
    w_ref = snapshot(m)

    restore(m, w_init)
    backward(m, x, y)
    opts = [AGD(m, policy=policy) for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    cuts = []
    for k, p in enumerate(opts[0].params):
        n = p.numel()
        cuts.append([0, n][k % 2] if k % 5 == 0 else int(torch.randint(1, n, (1,), generator=gen)))
    barrier, box, etas = threading.Barrier(2, timeout=60), {}, {}
    for r, o in enumerate(opts):
        o.bind(TwoRankBinding(o, r, cuts, barrier, box))

    def run(r):
        etas[r] = opts[r].step()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert float(etas[0]) == pytest.approx(float(eta_ref_), rel=1e-6)
    assert float(etas[1]) == pytest.approx(float(eta_ref_), rel=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), w_ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_state_dict_round_trip():
    m = tiny_gpt(bias=True)
    opt = AGD(m, gain=0.5)
    backward(m, *batch())
    opt.step()
    sd = opt.state_dict()
    opt2 = AGD(m, gain=1.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["gain"] == 0.5
    w0 = snapshot(m)
    e1 = opt.step()
    w1 = snapshot(m)
    restore(m, w0)
    e2 = opt2.step()
    assert float(e1) == float(e2)
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), w1[n])
    with pytest.raises(ValueError, match="policy"):
        AGD(m, policy="modular").load_state_dict(sd)
    with pytest.raises(ValueError, match="layer table"):
        AGD(tiny_gpt(bias=True, n_layer=1)).load_state_dict(sd)


def test_creating_and_loading_never_reinitialises():
    m = tiny_gpt()
    w0 = snapshot(m)
    opt = AGD(m)
    opt.load_state_dict(opt.state_dict())
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), w0[n])


def test_log_metrics():
    m = tiny_gpt(bias=True, tied=False)
    opt = AGD(m)
    opt.init_weights()
    backward(m, *batch())
    g, w0 = grads_of(m), snapshot(m)
    opt.step()
    out = opt.log_metrics()
    gn = math.sqrt(sum(float((v.double() ** 2).sum()) for v in g.values()))
    assert out["agd_grad_norm"] == pytest.approx(gn, rel=1e-5)
    eta_r, G_r, _, L = reference_step(reference_layers(m), g)  # from the spec's formulas
    assert out["agd_eta"] == pytest.approx(eta_r, rel=1e-5)
    assert out["agd_G"] == pytest.approx(G_r, rel=1e-5)
    shares = {k: v for k, v in out.items() if k.startswith("agd_share/")}
    assert sum(shares.values()) == pytest.approx(1.0, rel=1e-6)
    head = math.sqrt(V / D) * float(g["lm_head.weight"].double().norm()) / L / G_r
    assert out["agd_share/head"] == pytest.approx(head, rel=1e-5)
    assert set(shares) >= {"agd_share/attn_qkv", "agd_share/ln_gain", "agd_share/ln_bias", "agd_share/head"}
    # rel update of the mlp_fc role: mean over layers of ||d[W|b]|| / ||[W|b]||
    vals = []
    for i in range(2):
        names = [f"transformer.h.{i}.mlp.c_fc.weight", f"transformer.h.{i}.mlp.c_fc.bias"]
        params = dict(m.named_parameters())
        dw = math.sqrt(sum(float(((params[n].detach() - w0[n]) ** 2).sum()) for n in names))
        w = math.sqrt(sum(float((params[n].detach() ** 2).sum()) for n in names))
        vals.append(dw / w)
    assert out["agd_rel_update/mlp_fc"] == pytest.approx(sum(vals) / 2, rel=1e-4)


def test_float64_end_to_end():
    m = tiny_gpt(bias=True, dtype=torch.float64)
    opt = AGD(m)
    opt.init_weights()
    for _ in range(3):
        backward(m, *batch())
        eta = opt.step()
        assert eta.dtype == torch.float64
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("shape", [(64, 64), (192, 64), (64, 256), (3, 500), (301, 17), (4, 6, 5)])
def test_lean_orthogonal_init_is_torch_orthogonal_bit_for_bit(shape):
    # AGD's init (and the sharded init's replay) use orthogonal_fp64 to halve the QR's peak
    # memory; it must draw and return exactly what nn.init.orthogonal_ does
    from agdlm.optim.agd import orthogonal_fp64

    g_ref, g_new = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ref = torch.empty(shape, dtype=torch.float64)
    torch.nn.init.orthogonal_(ref, generator=g_ref)
    q = orthogonal_fp64(shape, g_new)
    assert torch.equal(q.reshape(shape), ref)
    assert torch.equal(g_new.get_state(), g_ref.get_state())


@pytest.mark.parametrize("small_piece_path", ["flat-buffer"], indirect=True)  # what this test is about
@pytest.mark.parametrize("policy", ["default", "modular"])
def test_sync_free_flat_sums_match_segment_reduce(monkeypatch, policy):
    """The CUDA form of the flat buffer (sums from fp64 prefix sums, gathered scales, no
    host sync) steps as the CPU form (segment_reduce) does: run here by turning it on for
    the CPU. Biases, LayerNorm gains (sign rule under default) and momentum all use it."""
    results = []
    for sync_free in (False, True):
        monkeypatch.setitem(agd_module.SYNC_FREE_SEGMENTS, "cpu", sync_free)
        m = tiny_gpt(bias=True)
        opt = AGD(m, policy=policy, variant="momentum")
        for step in range(3):
            m.zero_grad()
            backward(m, *batch(seed=step))
            opt.step()
        plans = [lay["flat"] for lay in opt._layout_cache.values() if lay["flat"] is not None]
        assert plans and all(("bounds" in plan) == sync_free for plan in plans)
        results.append(({n: p.detach().clone() for n, p in m.named_parameters()}, opt.log_metrics()))
    (weights, metrics), (weights_sf, metrics_sf) = results
    for name, want in weights.items():
        torch.testing.assert_close(weights_sf[name], want, rtol=1e-6, atol=1e-7, msg=name)
    assert metrics_sf.keys() == metrics.keys()  # incl. update sizes (the sign rule's nonzero counts)
    for key, want in metrics.items():
        assert math.isclose(metrics_sf[key], want, rel_tol=1e-5, abs_tol=1e-9), (key, metrics_sf[key], want)
