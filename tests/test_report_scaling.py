"""Compute scaling: FLOPs per token from the model's shape, the power-law fit L(C) = a C^-b + c
recovering known parameters, and the compute multiplier against tuned AdamW, end to end from
run folders."""

import json
from pathlib import Path

import pytest
import yaml

from agdlm.report.build import build_report
from agdlm.report.scaling import PowerLaw, fit_power_law
from agdlm.report.shapes import flops_per_token

DEPTH, BLOCK, TOKENS = 2, 64, 2**16


def hand_flops_per_token(width: int, depth: int = DEPTH, block: int = BLOCK) -> float:
    """6 N + 12 L d T with N the blocks and final LayerNorm, no bias: per block q,k,v and the
    projection (4 d^2), the MLP (8 d^2) and two LayerNorm gains (2 d); the final gain (d)."""
    n = depth * (12 * width**2 + 2 * width) + width
    return 6 * n + 12 * depth * width * block


def test_flops_per_token_from_the_models_shape():
    model = {"n_layer": DEPTH, "n_head": 2, "n_embd": 64, "block_size": BLOCK, "vocab_size": 320, "bias": False,
             "tie_embeddings": True, "dropout": 0.0}
    assert flops_per_token(model) == hand_flops_per_token(64) == 690048
    # the vocabulary is embedding: it changes nothing
    assert flops_per_token({**model, "vocab_size": 50304}) == hand_flops_per_token(64)


@pytest.mark.parametrize("a, b, c", [(50.0, 0.3, 1.5), (2e3, 0.25, 0.8), (10.0, 0.1, 0.0), (400.0, 0.2, 3.2)])
@pytest.mark.parametrize("points", [3, 6])
def test_power_law_fit_recovers_known_parameters(a, b, c, points):
    compute = [1e12 * 10 ** (3 * k / (points - 1)) for k in range(points)]
    losses = [a * x**-b + c for x in compute]
    fit = fit_power_law(compute, losses)
    assert fit.a == pytest.approx(a, rel=1e-4) and fit.b == pytest.approx(b, rel=1e-4)
    assert fit.c == pytest.approx(c, abs=1e-6)
    # and the inverse: the compute that reaches a loss
    assert fit.compute_at(fit.loss(3e13)) == pytest.approx(3e13, rel=1e-6)


def test_no_fit_with_too_few_widths_or_a_loss_that_rises():
    assert fit_power_law([1e12, 1e13], [3.0, 2.5]) is None
    assert fit_power_law([1e12, 1e12, 1e13], [3.0, 3.1, 2.5]) is None  # two distinct computes
    assert fit_power_law([1e12, 1e13, 1e14], [2.5, 2.8, 3.1]) is None
    assert PowerLaw(1.0, 0.5, 2.0).compute_at(2.0) is None  # the floor is never reached


def write_run(root: Path, name: str, optim: dict, width: int, final: float, seed: int = 0) -> None:
    config = {
        "model": {"n_layer": DEPTH, "n_head": 2, "n_embd": width, "block_size": BLOCK, "vocab_size": 320,
                  "bias": False, "tie_embeddings": True, "dropout": 0.0},
        "optim": {"policy": "default", "variant": "none", "gain": 1.0, "lr": 1.0, **optim},
        "data": {"tokenizer": "bytes"},
        "train": {"global_batch_size": 8, "max_tokens": TOKENS, "seed": seed, "run_name": name},
    }
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"step": 0, "tokens": 0, "kind": "eval", "val_loss": 6.0},
               {"step": 64, "tokens": TOKENS, "kind": "train", "train_loss": final, "tokens_per_s": 1e4},
               {"step": 64, "tokens": TOKENS, "kind": "eval", "val_loss": final}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "DONE").write_text("done\n")


def test_compute_multiplier_against_tuned_adamw(tmp_path):
    """AdamW on L(C) = 30 C^-0.15 + 1; Muon on the same law with twice the compute (2x), AGD at
    two widths only (too few to fit); the losses are written, the fits and 2x read back."""
    root = tmp_path / "runs"
    law = PowerLaw(30.0, 0.15, 1.0)
    widths = (32, 64, 96, 128)
    for width in widths:
        compute = hand_flops_per_token(width) * TOKENS
        for seed in (0, 1):
            noise = 0.004 * (seed - 0.5)  # seeds straddle the law: their mean is on it
            write_run(root, f"adamw-w{width}-s{seed}", {"name": "adamw", "lr": 3e-3}, width, law.loss(compute) + noise,
                      seed)
            write_run(root, f"adamw-bad-w{width}-s{seed}", {"name": "adamw", "lr": 3e-2}, width,
                      law.loss(compute) + 0.5, seed)
            write_run(root, f"muon-w{width}-s{seed}", {"name": "muon", "lr": 2e-2}, width,
                      law.loss(2 * compute) + noise, seed)
            if width in (32, 64):
                write_run(root, f"agd-w{width}-s{seed}", {"name": "agd"}, width, law.loss(compute) + 0.1, seed)
            # 1000x better and 1000x worse: no loss overlaps AdamW's, so only a bound is honest
            write_run(root, f"sf-w{width}-s{seed}", {"name": "schedulefree", "lr": 2.5e-3}, width,
                      law.loss(1000 * compute) + noise, seed)
            write_run(root, f"prodigy-w{width}-s{seed}", {"name": "prodigy"}, width, law.loss(compute / 1000) + noise,
                      seed)
    result = build_report([root], tmp_path / "rep")
    rows = {r.split(" | ")[1]: r for r in result["scaling_table"].splitlines()[2:]}
    adamw = [c.strip() for c in rows["AdamW"].strip("|").split("|")]
    assert adamw[2] == "32, 64, 96, 128"
    assert float(adamw[3]) == pytest.approx(30.0, rel=1e-2) and float(adamw[4]) == pytest.approx(0.15, abs=1e-3)
    assert float(adamw[5]) == pytest.approx(1.0, abs=1e-3)
    muon = [c.strip() for c in rows["Muon"].strip("|").split("|")]
    assert muon[6].startswith("2x at loss") and "extrapolated" not in muon[6]
    assert "too few widths to fit (2 < 3)" in rows["AGD default"]
    smallest, largest = hand_flops_per_token(32) * TOKENS, hand_flops_per_token(128) * TOKENS
    better = [c.strip() for c in rows["Schedule-free"].strip("|").split("|")][6]
    assert better == (f"more than {largest / smallest:.3g}x at loss {law.loss(largest):.4f} "
                      "(the losses do not overlap)")
    worse = [c.strip() for c in rows["Prodigy"].strip("|").split("|")][6]
    assert worse == (f"less than {smallest / largest:.3g}x at loss {law.loss(largest / 1000):.4f} "
                     "(the losses do not overlap)")
    assert "compute_scaling.png" in [p.name for p in result["plots"]]
