"""`AGD(compile=True)` / `optim.compile`: the step's scale arithmetic and its guarded updates
through torch.compile (inductor; on the CPU it builds C++, so these need a C++ compiler).
The eager step is the reference: it is itself checked against the spec in test_agd_math."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agdlm.config import load_config
from agdlm.model import GPT, GPTConfig
from agdlm.optim import AGD
from agdlm.train import has_cpp_compiler, train

needs_compiler = pytest.mark.skipif(not has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")

V, T = 96, 16
CASES = {  # policy, variant, bias, tied: Frobenius [W|b] pairs, q/k/v slices, sign gains, rows, spectral
    "default-bias": ("default", "none", True, True),
    "modular-untied": ("modular", "none", True, False),
    "agd_exp": ("agd_exp", "none", True, True),
    "spectral": ("default", "spectral", True, True),
}


# Every piece through the per-tensor update (here the small ones would share the eager flat
# buffer): the compiled update then sees sign gains, biases and q/k/v blocks too.
PER_TENSOR = pytest.mark.parametrize("small_piece_path", ["per-tensor"], indirect=True)


def model_and_grads(policy, variant, bias, tied, compile):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=V, bias=bias, tie_embeddings=tied))
    opt = AGD(m, policy=policy, variant=variant, compile=compile)
    opt.init_weights()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (4, T), generator=g), torch.randint(0, V, (4, T), generator=g)
    m(x, y)[1].backward()
    return m, opt


@needs_compiler
@PER_TENSOR
@pytest.mark.filterwarnings("ignore:AGD policy 'agd_exp' freezes")
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_matches_the_eager_step(case, small_piece_path):
    torch._dynamo.reset()
    eager_m, eager = model_and_grads(*CASES[case], compile=False)
    comp_m, comp = model_and_grads(*CASES[case], compile=True)
    before = {n: p.detach().clone() for n, p in eager_m.named_parameters()}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager.step()
    comp.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2  # derive + update really compiled
    assert not torch._dynamo.utils.counters["graph_break"]  # each one whole graph
    moved = 0
    for (name, pe), pc in zip(eager_m.named_parameters(), comp_m.parameters()):
        due, got = pe.detach() - before[name], pc.detach() - before[name]
        if due.abs().max() == 0:
            assert got.abs().max() == 0, name
            continue
        moved += 1
        # fp32: the compiled kernel may fuse w + s*g (one rounding) and sum G in another order:
        # 1e-5 of the update, plus the two roundings of the weight it lands on
        ulp = torch.finfo(torch.float32).eps * before[name].abs().max()
        assert (got - due).abs().max() <= 1e-5 * due.abs().max() + 2 * ulp, name
    assert moved >= 8
    for key in ("G", "eta"):
        assert torch.allclose(comp.last_stats[key], eager.last_stats[key], rtol=1e-6, atol=0), key
    le, lc = eager.log_metrics(), comp.log_metrics()
    assert le.keys() == lc.keys()
    assert all(abs(le[k] - lc[k]) <= 1e-5 * max(abs(le[k]), 1e-12) for k in le), (le, lc)


@needs_compiler
@PER_TENSOR
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("case, where", [
    ("default-bias", "transformer.h.0.attn.c_attn.weight"),  # a matrix with its bias: the compiled update
    ("modular-untied", "transformer.h.0.attn.c_attn.weight"),  # its q/k/v row blocks
    ("modular-untied", "transformer.wpe.weight"),  # rows rule: the eager row update and its guard
])
def test_compiled_skipped_step_leaves_weights_bitwise(bad, case, where, small_piece_path):
    torch._dynamo.reset()
    m, opt = model_and_grads(*CASES[case], compile=True)
    grad = dict(m.named_parameters())[where].grad
    grad[3, 5] = bad
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    assert int(opt.skipped_steps) == 1 and float(opt.last_stats["eta"]) == 0.0
    assert all(torch.equal(p.detach(), before[n]) for n, p in m.named_parameters())
    grad[3, 5] = 0.0
    opt.step()  # finite again: the same compiled step moves every weight with a gradient
    assert int(opt.consecutive_skips) == 0
    assert all(not torch.equal(p.detach(), before[n]) for n, p in m.named_parameters() if p.grad is not None
               and p.grad.abs().max() > 0)


@needs_compiler
def test_optim_compile_trains_and_may_change_on_resume(tiny_overrides):
    torch._dynamo.reset()
    common = tiny_overrides + ["train.max_steps=4", "train.ckpt_interval=2", "train.eval_interval=2"]
    eager = Path(train(load_config(None, common + ["train.run_name=eager"]))["run_dir"])
    flipped = common + ["train.run_name=flipped"]
    train(load_config(None, flipped + ["train.max_steps=2"]))
    (Path(tiny_overrides[-1].split("=", 1)[1]) / "flipped" / "DONE").unlink()  # as if it had been stopped
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run = Path(train(load_config(None, flipped + ["optim.compile=true"]))["run_dir"])  # resumed compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= graphs + 2  # the flag reached the optimiser
    a = [json.loads(line) for line in (eager / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        key = "train_loss" if ra["kind"] == "train" else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)


def test_optim_compile_without_a_compiler_is_one_config_line(tiny_overrides, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env["PATH"] = str(tmp_path / "empty")  # no g++ or clang++ to be found
    out = Path(tiny_overrides[-1].split("=", 1)[1])
    proc = subprocess.run([sys.executable, "-m", "agdlm", "train", *tiny_overrides, "optim.compile=true"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.compile=true" in lines[0] and "C++" in lines[0], proc.stderr
    assert not out.exists()  # refused before anything was written
