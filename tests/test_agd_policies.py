"""Policies (default, paper, agd_exp, modular), init, rule errors and `agdlm layers`, each
checked against computations written here from AGD_SPEC.md."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from agdlm.model import CausalSelfAttention, GPT, GPTConfig
from agdlm.optim import AGD, RuleError

pytestmark = pytest.mark.usefixtures("small_piece_path")  # every check on both update paths (conftest)

V, T, D = 64, 8, 16


def tiny_gpt(bias=False, tied=True, n_layer=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=D, block_size=T, vocab_size=V, bias=bias,
                         tie_embeddings=tied)).to(dtype)


def backward(model, x, y):
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()


def batch(seed=1, b=4, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, T), generator=g), torch.randint(0, vocab, (b, T), generator=g)


def svals(w):
    return torch.linalg.svdvals(w.detach().double())


def eta_ref(G):
    return math.log((1 + math.sqrt(1 + 4 * G)) / 2)


# ---- init ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_default_init_singular_values(tied):
    m = tiny_gpt(bias=True, tied=tied, n_layer=3)
    AGD(m).init_weights()
    n, d = 3, D
    expect = {"transformer.wte.weight": math.sqrt(V / d), "transformer.wpe.weight": math.sqrt(T / d)}
    if not tied:
        expect["lm_head.weight"] = math.sqrt(V / d)
    for i in range(n):
        h = f"transformer.h.{i}."
        expect.update({h + "attn.c_attn.weight": 1.0, h + "attn.c_proj.weight": 1 / math.sqrt(n),
                       h + "mlp.c_fc.weight": 2.0, h + "mlp.c_proj.weight": 0.5 / math.sqrt(n)})
    for name, p in m.named_parameters():
        if name in expect:
            torch.testing.assert_close(svals(p), torch.full((min(p.shape),), expect[name], dtype=torch.float64),
                                       rtol=1e-6, atol=1e-6, msg=name)
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
        else:
            assert "ln_" in name and name.endswith("weight") and torch.all(p == 1), name


@pytest.mark.parametrize("tied", [True, False])
def test_modular_init(tied):
    m = tiny_gpt(bias=True, tied=tied, n_layer=2)
    AGD(m, policy="modular").init_weights()
    n, d = 2, D
    for blk in m.transformer.h:
        for k in range(3):  # q, k, v blocks each semi-orthogonal with s = 1
            torch.testing.assert_close(svals(blk.attn.c_attn.weight[k * d : (k + 1) * d]),
                                       torch.ones(d, dtype=torch.float64), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(svals(blk.attn.c_proj.weight), torch.full((d,), 1 / math.sqrt(2 * n),
                                   dtype=torch.float64), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(svals(blk.mlp.c_proj.weight), torch.full((d,), 0.5 / math.sqrt(2 * n),
                                   dtype=torch.float64), rtol=1e-6, atol=1e-6)
        assert torch.all(blk.attn.c_attn.bias == 0)
    rows_wpe = m.transformer.wpe.weight.detach().norm(dim=1)
    if tied:  # wte/lm_head by the head row; wpe rows of norm 1 (the token rows' mean size)
        torch.testing.assert_close(svals(m.lm_head.weight), torch.full((d,), math.sqrt(V / d), dtype=torch.float64))
        torch.testing.assert_close(rows_wpe, torch.ones(T, dtype=torch.float64))
    else:  # rows rule, s = 1: rows of RMS 1
        rms = m.transformer.wte.weight.detach().norm(dim=1) / math.sqrt(d)
        torch.testing.assert_close(rms, torch.ones(V, dtype=torch.float64))
        torch.testing.assert_close(rows_wpe / math.sqrt(d), torch.ones(T, dtype=torch.float64))


# ---- paper -----------------------------------------------------------------------------------

def algorithm1(weights, grads, gain):
    """AGD_SPEC section 1, written out for a list of matrices."""
    L = len(weights)
    G = sum(math.sqrt(w.shape[0] / w.shape[1]) * float(g.norm()) for w, g in zip(weights, grads)) / L
    eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    new = [w - gain * (eta / L) * math.sqrt(w.shape[0] / w.shape[1]) * g / g.norm() for w, g in zip(weights, grads)]
    return eta, new


def test_paper_is_algorithm1():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12, bias=False), nn.ReLU(), nn.Linear(12, 7, bias=False), nn.Tanh(),
                        nn.Linear(7, 3, bias=False)).double()
    opt = AGD(net, policy="paper", gain=0.9)
    opt.init_weights()
    for lin in (net[0], net[2], net[4]):  # init: semi-orthogonal * sqrt(d_out/d_in)
        w = lin.weight
        torch.testing.assert_close(svals(w), torch.full((min(w.shape),), math.sqrt(w.shape[0] / w.shape[1]),
                                   dtype=torch.float64))
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    for _ in range(3):
        net.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        ws = [net[i].weight.detach().clone() for i in (0, 2, 4)]
        gs = [net[i].weight.grad.clone() for i in (0, 2, 4)]
        eta_r, new = algorithm1(ws, gs, 0.9)
        eta = opt.step()
        assert float(eta) == pytest.approx(eta_r, rel=1e-12)
        for i, w in zip((0, 2, 4), new):
            torch.testing.assert_close(net[i].weight.detach(), w, rtol=1e-12, atol=1e-14)


def test_paper_refuses_1d_and_tied_with_names():
    with pytest.raises(RuleError, match=r"'0\.bias'"):
        AGD(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)), policy="paper")
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    with pytest.raises(RuleError, match=r"tied weight '0\.weight'"):
        AGD(nn.Sequential(a, nn.ReLU(), b), policy="paper")
    with pytest.raises(RuleError, match=r"transformer\.wte\.weight"):
        AGD(tiny_gpt(), policy="paper")
    with pytest.raises(RuleError, match=r"1-D tensor '1\.weight'"):
        AGD(nn.Sequential(nn.Linear(3, 4, bias=False), nn.LayerNorm(4, bias=False)), policy="paper")
    with pytest.raises(RuleError, match=r"transformer\.wte\.weight"):  # an nn.Embedding: not Algorithm 1
        AGD(tiny_gpt(tied=False), policy="paper")


def test_unmatched_tensor_error_names_it():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(RuleError, match=r"'scale'"):
        AGD(Odd())
    with pytest.raises(RuleError, match=r"'1\.weight'"):
        AGD(nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 2)))
    with pytest.raises(ValueError, match="policy"):
        AGD(tiny_gpt(), policy="nope")


# ---- agd_exp ---------------------------------------------------------------------------------

def test_agd_exp():
    m = tiny_gpt(bias=True, tied=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = AGD(m, policy="agd_exp")
    assert len([w for w in rec if "freezes LayerNorm" in str(w.message)]) == 1
    backward(m, *batch())
    P = dict(m.named_parameters())
    g = {k: p.grad.clone() for k, p in P.items()}
    w0 = {k: p.detach().clone() for k, p in P.items()}
    n, d = 2, D
    s = {"transformer.wte.weight": math.sqrt(V / d), "transformer.wpe.weight": math.sqrt(T / d)}
    Lw = {"transformer.wte.weight": 1, "transformer.wpe.weight": 1}
    for i in range(n):
        h = f"transformer.h.{i}."
        s.update({h + "attn.c_attn.weight": 1.0, h + "attn.c_proj.weight": 1 / math.sqrt(n),
                  h + "mlp.c_fc.weight": 2.0, h + "mlp.c_proj.weight": 0.5 / math.sqrt(n)})
        Lw.update({h + "attn.c_attn.weight": 3, h + "attn.c_proj.weight": 1, h + "mlp.c_fc.weight": 1,
                   h + "mlp.c_proj.weight": 1})
    L = sum(Lw.values())  # c_attn counts 3 (the depth-lookup bug fixed); LayerNorms frozen
    G = sum(s[k] * float(g[k].norm()) for k in s) / L
    eta = eta_ref(G)
    assert float(opt.step()) == pytest.approx(eta, rel=1e-10)
    for k, p in P.items():
        dw = p.detach() - w0[k]
        if "ln_" in k:
            assert torch.all(dw == 0), k
        elif k in s:
            torch.testing.assert_close(dw, -eta / L * s[k] * g[k] / g[k].norm(), rtol=1e-9, atol=1e-12)
        else:  # a Linear bias: its weight's step size over the weight's gradient norm
            wk = k[: -len("bias")] + "weight"
            torch.testing.assert_close(dw, -eta / L * s[wk] * g[k] / g[wk].norm(), rtol=1e-9, atol=1e-12)


# ---- modular ---------------------------------------------------------------------------------

class SplitQKV(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))


def test_modular_fused_c_attn_equals_three_linears():
    torch.manual_seed(0)
    d = D
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=d, block_size=T, bias=True)
    attn = CausalSelfAttention(cfg).double()
    attn.c_proj.requires_grad_(False)
    x = torch.randn(3, T, d, dtype=torch.float64)
    attn(x).square().sum().backward()
    split = SplitQKV(d).double()
    with torch.no_grad():
        for k, lin in enumerate((split.q, split.k, split.v)):
            rows = slice(k * d, (k + 1) * d)
            lin.weight.copy_(attn.c_attn.weight[rows])
            lin.bias.copy_(attn.c_attn.bias[rows])
            lin.weight.grad = attn.c_attn.weight.grad[rows].clone()
            lin.bias.grad = attn.c_attn.bias.grad[rows].clone()
    e1 = AGD(attn, policy="modular").step()
    e2 = AGD(split, policy="modular").step()
    assert float(e1) == pytest.approx(float(e2), rel=1e-12)
    torch.testing.assert_close(attn.c_attn.weight.detach(), torch.cat([split.q.weight, split.k.weight,
                                                                       split.v.weight]).detach())
    torch.testing.assert_close(attn.c_attn.bias.detach(), torch.cat([split.q.bias, split.k.bias,
                                                                     split.v.bias]).detach())


def test_modular_rows_rule_untied_embeddings():
    m = tiny_gpt(bias=False, tied=False, n_layer=2)
    opt = AGD(m, policy="modular", gain=1.1)
    opt.init_weights()
    x, y = batch(vocab=10)  # only token rows 0..9 occur in the batch
    backward(m, x, y)
    w0 = m.transformer.wte.weight.detach().clone()
    eta = float(opt.step())
    L = 1 + 1 + 1 + 2 * (3 + 1 + 1 + 1 + 2) + 1  # wte, wpe, head, blocks, ln_f
    assert opt.L == L
    dw = m.transformer.wte.weight.detach() - w0
    used = torch.zeros(V, dtype=torch.bool)
    used[x.unique()] = True
    assert torch.all(dw[~used] == 0)
    rms = dw[used].norm(dim=1) / math.sqrt(D)
    torch.testing.assert_close(rms, torch.full_like(rms, 1.1 * eta / L), rtol=1e-9, atol=0)


def modular_G_reference(m, g) -> tuple[float, float]:
    """(G, L) of the `modular` table (spec section 3), untied, from the gradients alone."""
    n, d, vocab = m.config.n_layer, m.config.n_embd, m.config.vocab_size
    g = {k: v.double() for k, v in g.items()}
    total, L = 0.0, 0.0

    def frob(names_rows, s):  # [(name, row slice or None)] as one Frobenius layer
        parts = [g[nm] if rows is None else g[nm][rows] for nm, rows in names_rows]
        return s * math.sqrt(sum(float((p ** 2).sum()) for p in parts))

    for name in ("transformer.wte.weight", "transformer.wpe.weight"):  # rows rule, s = 1
        total += math.sqrt(d) * float(g[name].norm(dim=1).sum())
        L += 1
    total += frob([("lm_head.weight", None)], math.sqrt(vocab / d))
    L += 1
    for i in range(n):
        h = f"transformer.h.{i}."
        for b in range(3):  # q, k, v blocks, each with its third of the bias
            rows = slice(b * d, (b + 1) * d)
            total += frob([(h + "attn.c_attn.weight", rows), (h + "attn.c_attn.bias", rows)], math.sqrt(d / (d + 1)))
        proj = 1 / math.sqrt(2 * n)
        total += frob([(h + "attn.c_proj.weight", None), (h + "attn.c_proj.bias", None)], proj * math.sqrt(d / (d + 1)))
        total += frob([(h + "mlp.c_fc.weight", None), (h + "mlp.c_fc.bias", None)], 2 * math.sqrt(d / (d + 1)))
        total += frob([(h + "mlp.c_proj.weight", None), (h + "mlp.c_proj.bias", None)],
                      math.sqrt(1 / 4) * proj * math.sqrt(4 * d / (4 * d + 1)))
        L += 6
    for ln in [f"transformer.h.{i}.ln_{j}" for i in range(n) for j in (1, 2)] + ["transformer.ln_f"]:
        total += float(g[ln + ".weight"].abs().sum()) + math.sqrt(d) * float(g[ln + ".bias"].norm())
        L += 1
    return total / L, L


def test_modular_invariant_inner_product():
    m = tiny_gpt(bias=True, tied=False)
    opt = AGD(m, policy="modular")
    opt.init_weights()
    backward(m, *batch())
    g = {k: p.grad.clone() for k, p in m.named_parameters()}
    w0 = {k: p.detach().clone() for k, p in m.named_parameters()}
    eta = float(opt.step())
    G, L = modular_G_reference(m, g)  # independent of the optimiser's own bookkeeping
    assert opt.L == L
    assert float(opt.last_stats["G"]) == pytest.approx(G, rel=1e-6)
    assert eta == pytest.approx(math.log((1 + math.sqrt(1 + 4 * G)) / 2), rel=1e-6)
    inner = sum(float((g[k] * (p.detach() - w0[k])).sum()) for k, p in m.named_parameters())
    assert inner == pytest.approx(-eta * G, rel=1e-6)


def test_modular_tied_position_rows_move_by_eta_over_L():
    """Tied `modular`: wpe by the rows rule with s = 1/sqrt(d): rows of L2 norm 1 at init and
    each row with a gradient moves by exactly gain * eta / L in L2 norm."""
    m = tiny_gpt(bias=False, tied=True)
    opt = AGD(m, policy="modular", gain=0.9)
    opt.init_weights()
    norms = m.transformer.wpe.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-6, atol=0)
    backward(m, *batch())
    w0 = m.transformer.wpe.weight.detach().clone()
    eta = float(opt.step())
    moved = (m.transformer.wpe.weight.detach() - w0).norm(dim=1)
    torch.testing.assert_close(moved, torch.full_like(moved, 0.9 * eta / opt.L), rtol=1e-5, atol=0)


# ---- the layers command ----------------------------------------------------------------------

def test_layers_cli(capsys):
    from agdlm.optim.layers_cli import main

    assert main(["configs/tiny.yaml", "model.n_layer=2", "model.bias=true"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.1.attn.c_attn.weight" in out and "attn_qkv" in out
    # default L: per block c_attn 3 + c_proj + c_fc + c_proj + 2 LN = 8; wte/head, wpe, ln_f
    assert "total L = 19" in out


def test_layers_cli_merges_configs_and_refuses_bad_input_in_one_line(capsys):
    from agdlm.optim.layers_cli import main

    # the study's recommended setting composes with a model config, as for `agdlm train`
    assert main(["model/tiny.yaml", "optim/agd-spectral-momentum.yaml"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("transformer.")]
    assert {r[0]: r[4] for r in rows}["transformer.wte.weight"] == "spectral"
    for argv, names in ((["configs/tiny.yaml", "optim.variant=bogus"], "optim.variant"),
                        (["no-such-config.yaml"], "no-such-config.yaml"),
                        (["configs/tiny.yaml", "optim.policy=paper"], "tied weight")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and names in err, err


def test_layers_cli_meta_gpt2_xl(capsys):
    from agdlm.optim.layers_cli import main

    assert main(["configs/gpt2-1.5b.yaml"]) == 0
    out = capsys.readouterr().out
    # 48 blocks x (c_attn 3 + c_proj + c_fc + mlp c_proj + ln_1 + ln_2) + wte/head + wpe + ln_f
    assert "total L = 387 " in out
    roles = [line.split()[2] for line in out.splitlines()[3:] if line.startswith("transformer.")]
    counts = {r: roles.count(r) for r in set(roles)}
    assert counts == {"attn_qkv": 48, "attn_proj": 48, "mlp_fc": 48, "mlp_proj": 48, "ln_gain": 97,
                      "wte_head": 1, "wpe": 1}, counts
