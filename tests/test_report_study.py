"""`agdlm report` on a study the size of round 2 (about 440 synthetic runs: every optimiser
family, the architecture axis, a longer horizon, AGD gain runs, runs that diverged, runs timed on
a shared machine): every table and plot is made, from config.yaml alone (folder names say nothing)."""

import json
import math
from pathlib import Path

import pytest
import yaml

from agdlm.report.build import build_report

ADAMW_LRS = (6.25e-4, 1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2)
MUON_LRS = (5e-3, 1e-2, 2e-2, 4e-2, 8e-2)
SF_LRS = (1.25e-3, 2.5e-3, 5e-3)
ROUND1_AGD = ("none", "momentum", "spectral", "spectral_momentum")
# optimiser -> (effective-compute multiplier, how fast its curve falls)
QUALITY = {"adamw": (1.0, 5.0), "muon": (1.5, 7.0), "schedulefree": (0.9, 5.0), "prodigy": (0.7, 6.0),
           "none": (0.2, 4.0), "momentum": (0.25, 4.0), "spectral": (0.8, 6.0), "spectral_momentum": (1.2, 6.5)}


def cells() -> list[dict]:
    """Round 1's 8 cells, the architecture axis, and the longer horizon (seed 0 only)."""
    out = []
    for width in (64, 128, 192):
        for batch in (8, 32):
            out.append(dict(width=width, depth=4, batch=batch, tokenizer="bytes", block=128, tokens=2**20))
    for batch in (8, 32):
        out.append(dict(width=64, depth=4, batch=batch, tokenizer="gpt2", block=64, tokens=2**18))
    for width, depth in ((128, 2), (128, 8), (384, 4)):
        out.append(dict(width=width, depth=depth, batch=8, tokenizer="bytes", block=128, tokens=2**20, arch=True))
    out.append(dict(width=128, depth=4, batch=8, tokenizer="bytes", block=128, tokens=2**22, long=True))
    return out


def best_lr(family: str, cell: dict) -> float:
    base = {"adamw": 3e-3, "muon": 2e-2, "schedulefree": 2.5e-3}[family]
    return base * (128 / cell["width"]) ** 0.5 * (4 / cell["depth"]) ** 0.25  # AdamW's moves with width


def final_loss(cell: dict, quality: str, lr: float | None, family: str, seed: int, gain: float = 1.0) -> float:
    floor = 1.2 if cell["tokenizer"] == "bytes" else 4.0
    compute = cell["width"] ** 2 * cell["depth"] * cell["tokens"] * QUALITY[quality][0]
    loss = floor + 1.5e3 * compute ** -0.3
    if lr is not None:
        loss += 0.08 * math.log2(lr / best_lr(family, cell)) ** 2
    loss += 0.05 * math.log2(gain) ** 2 + 0.006 * seed
    return loss


def write_run(root: Path, cell: dict, seed: int, optim: dict, final: float | None, speed: float,
              idle: bool = True, diverge: bool = False) -> None:
    name = f"run{len(list(root.iterdir())) if root.exists() else 0:04d}"  # the folder name says nothing
    config = {
        "model": {"n_layer": cell["depth"], "n_head": 4, "n_embd": cell["width"], "block_size": cell["block"],
                  "vocab_size": 320 if cell["tokenizer"] == "bytes" else 50304, "bias": False,
                  "tie_embeddings": True, "dropout": 0.0},
        "optim": {"policy": "default", "variant": "none", "gain": 1.0, "lr": 1.0, **optim},
        "data": {"tokenizer": cell["tokenizer"]},
        "train": {"global_batch_size": cell["batch"], "max_tokens": cell["tokens"], "seed": seed, "run_name": name},
        "log": {"group": "synthetic-round-2"},
    }
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    start = 5.7 if cell["tokenizer"] == "bytes" else 10.8
    rate = QUALITY[optim.get("variant") if optim["name"] == "agd" else optim["name"]][1]
    per_eval = cell["tokens"] // 16
    records = []
    for k in range(17):
        tokens = k * per_eval
        frac = k / 16
        if diverge and frac > 0.5:
            records.append({"step": k, "tokens": tokens, "kind": "eval", "val_loss": float("nan")})
            break
        shape = (math.exp(-rate * frac) - math.exp(-rate)) / (1 - math.exp(-rate))
        if k:
            train = {"step": k, "tokens": tokens, "kind": "train", "train_loss": 3.0,
                     "tokens_per_s": speed * (1 + 0.03 * (k % 3))}
            if optim["name"] == "agd":  # what AGD logs: its step size, G, per-role diagnostics
                eta = 0.1 * optim.get("gain", 1.0) * (1 + 1 / k) * (1 + 0.01 * seed)
                train.update({"agd_eta": eta, "agd_G": 2 * eta, "agd_share/blocks": 0.8, "agd_share/embedding": 0.2,
                              "agd_rel_update/blocks": eta / 50, "agd_rel_update/embedding": eta / 200})
            records.append(train)
        records.append({"step": k, "tokens": tokens, "kind": "eval", "val_loss": final + (start - final) * shape})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if not diverge:
        (run / "DONE").write_text("done\n")
    if not idle:
        (run / "timing.json").write_text(json.dumps({"idle": False, "note": "ran beside the test suite"}))


def write_study(root: Path) -> int:
    """Round 2's grid, synthetic; returns the number of runs."""
    for cell in cells():
        speed = 3e9 / (cell["width"] ** 2 * cell["depth"])
        seeds = (0,) if cell.get("long") else (0, 1)
        idle = not cell.get("long")  # the long runs shared the machine: their speed comes from idle runs
        for seed in seeds:
            def swept(family, lrs, factor):
                if cell.get("long"):  # the best two lrs only
                    lrs = sorted(lrs, key=lambda lr: abs(math.log(lr / best_lr(family, cell))))[:2]
                for lr in lrs:
                    diverge = family == "adamw" and lr == 2e-2 and cell["width"] == 384
                    write_run(root, cell, seed, {"name": family, "lr": lr},
                              final_loss(cell, family, lr, family, seed), speed * factor, idle, diverge)
            swept("adamw", ADAMW_LRS, 1.0)
            swept("muon", MUON_LRS, 0.9)
            swept("schedulefree", SF_LRS, 1.0)
            write_run(root, cell, seed, {"name": "prodigy", "lr": 1.0}, final_loss(cell, "prodigy", None, "", seed),
                      speed * 0.7, idle, diverge=cell["depth"] == 8 and seed == 1)
            variants = ("none", "spectral_momentum") if cell.get("arch") or cell.get("long") else ROUND1_AGD
            for variant in variants:
                write_run(root, cell, seed, {"name": "agd", "variant": variant},
                          final_loss(cell, variant, None, "", seed), speed * 0.8, idle)
            if (cell["width"], cell["depth"]) in ((128, 4), (128, 2), (128, 8)) and not cell.get("long") \
                    and (cell["batch"] == 8 or cell["depth"] == 4):
                for gain in (0.5, 2.0, 4.0):
                    write_run(root, cell, seed, {"name": "agd", "variant": "spectral_momentum", "gain": gain},
                              final_loss(cell, "spectral_momentum", None, "", seed, gain), speed * 0.8, idle)
    return len(list(root.iterdir()))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "runs"
    n = write_study(root)
    out = root.parent / "report"
    return n, build_report([root], out)


def test_a_round_two_study_gives_every_table_and_plot(study):
    n, result = study
    assert 400 <= n <= 460 and len(result["runs"]) == n
    assert sorted(p.name for p in result["plots"]) == sorted(
        ["val_loss_vs_tokens.png", "lr_transfer.png", "gain_sensitivity.png", "compute_scaling.png",
         "agd_eta.png", "agd_roles.png"])
    md = result["report"].read_text()
    assert "Not drawn" not in md
    # 12 cells, each with its detail table; the families named from config.yaml
    assert len(result["details"]) == 12
    head = result["ratio_table"].splitlines()[0]
    for column in ("AGD default", "AGD default+spectral_momentum", "Muon", "Schedule-free", "Prodigy",
                   "best Muon (final val loss @ lr, per seed)"):
        assert f"| {column} |" in head
    assert "gain 2" not in head  # the sensitivity runs are kept out of the settings to choose from
    assert "| AGD default+spectral_momentum | 2 | 4 | 8 | bytes |" not in md
    gain_rows = result["gain_table"].splitlines()[2:]
    assert len(gain_rows) == 4 and all("AGD default+spectral_momentum" in r for r in gain_rows)
    # failures are shown, not dropped: Prodigy diverged at depth 8, seed 1
    depth8 = next(v for k, v in result["details"].items() if k.startswith("w128 L8"))
    assert "| Prodigy | 1 | - | diverged" in depth8
    summary = {r.split(" | ")[0].lstrip("| "): r for r in result["ratio_summary"].splitlines()[2:]}
    assert summary["Prodigy"].endswith("| 1 |")  # one cell with a failed run
    # the long runs shared the machine: their speed is taken from the idle 2^20-token runs of the
    # same shape and optimiser (a run's length does not change its arithmetic), marked ‡
    long = next(v for k, v in result["details"].items() if "4.19M" in k).splitlines()[2:]
    assert len(long) == 6 and all(line.split(" | ")[7].endswith("µs‡") for line in long)
    assert "‡" not in depth8 and not any("†" in detail for detail in result["details"].values())
    assert "ran beside the test suite" not in md  # no run is left with a shared-machine figure
    # the compute fits: at batch 8, four widths for the 6 settings run at width 384 (round 1's
    # other two AGD variants were not), three at batch 32
    scaling = result["scaling_table"].splitlines()[2:]
    assert len(scaling) == 2 * 8 and "too few widths" not in result["scaling_table"]
    assert sum("| 64, 128, 192, 384 |" in line for line in scaling) == 6
