"""The comparison against tuned AdamW, from real run folders written here (config.yaml,
metrics.jsonl, DONE, timing.json): tokens to the target (interpolated, or "not reached"), the
best lr per family, cell and seed, the ratios and the beats-Muon summary, timings marked as not
idle. Every expected number is worked out by hand from the losses written below."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from agdlm.report.build import build_report
from agdlm.report.compare import tokens_to_reach
from agdlm.report.runs import read_runs

BATCH, BLOCK = 16, 64  # 1,024 tokens per step
TOKENS = 4096


def write_run(root: Path, name: str, optim: dict, *, final: float | None = None, curve=None, width=64, seed=0,
              train=None, done=True, timing=None, diverged=False, stopped=False) -> Path:
    """A run folder as the trainer leaves it. `curve`: (tokens, val loss) evals; by default a
    plain fall to `final`. `train`: the train records' extra fields, one dict per record.
    `diverged`: a last eval of NaN; `stopped`: the trainer's DIVERGED marker (a non-finite loss
    or AGD's skip limit stopped it between evals, so every eval it wrote is finite)."""
    config = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": width, "block_size": BLOCK, "vocab_size": 320,
                  "bias": False, "tie_embeddings": True, "dropout": 0.0},
        "optim": {"policy": "default", "variant": "none", "gain": 1.0, "lr": 1.0, **optim},
        "data": {"tokenizer": "bytes"},
        "train": {"global_batch_size": BATCH, "max_tokens": TOKENS, "seed": seed, "run_name": name},
        "log": {"group": "compare"},
    }
    curve = curve or [(0, 7.0), (1024, 5.0), (2048, 4.5), (3072, 4.2), (4096, final)]
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"step": t // 1024, "tokens": t, "kind": "eval", "val_loss": v} for t, v in curve]
    if diverged:
        records.append({"step": 5, "tokens": 5120, "kind": "eval", "val_loss": float("nan")})
    for i, extra in enumerate(train or [{"tokens_per_s": 1000.0}]):
        records.append({"step": i + 1, "tokens": (i + 1) * 1024, "kind": "train", "train_loss": 4.0, **extra})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (run / "DONE").write_text("done\n")
    if stopped:
        (run / "DIVERGED").write_text("AGD skipped 3 steps in a row up to step 5; stopping.\n")
    if timing is not None:
        (run / "timing.json").write_text(json.dumps(timing))
    return run


def csv_rows(out: Path) -> list[dict]:
    with open(out / "vs_adamw.csv") as f:
        return list(csv.DictReader(f))


def table_cells(markdown: str) -> list[dict]:
    lines = markdown.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def row(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


# ---- tokens to the tuned AdamW's final val loss -------------------------------------------

def test_tokens_to_reach_interpolates_between_evals():
    curve = [(0, 7.0), (1000, 5.0), (2000, 4.0), (3000, 3.5)]
    assert tokens_to_reach(curve, 4.5) == pytest.approx(1500.0)  # halfway from 5.0 to 4.0
    assert tokens_to_reach(curve, 3.6) == pytest.approx(2800.0)  # 0.4 of the way from 4.0 to 3.5
    assert tokens_to_reach(curve, 4.0) == 2000.0  # exactly at an eval
    assert tokens_to_reach(curve, 8.0) == 0.0  # already there at the first eval
    assert tokens_to_reach(curve, 3.4) is None  # never reached
    # the first crossing counts, not a later one after the curve went back up
    assert tokens_to_reach([(0, 7.0), (100, 3.0), (200, 5.0), (300, 2.0)], 4.0) == pytest.approx(75.0)


def test_tokens_to_target_in_the_report(tmp_path):
    root = tmp_path / "runs"
    adamw_curve = [(0, 7.0), (1024, 5.0), (2048, 4.2), (3072, 3.9), (4096, 3.6)]
    write_run(root, "adamw-best", {"name": "adamw", "lr": 3e-3}, curve=adamw_curve)
    write_run(root, "adamw-worse", {"name": "adamw", "lr": 1e-3}, final=3.8)
    write_run(root, "agd", {"name": "agd", "variant": "spectral"},
              curve=[(0, 7.0), (1024, 5.0), (2048, 4.0), (3072, 3.5), (4096, 3.4)])
    write_run(root, "muon", {"name": "muon", "lr": 2e-2},
              curve=[(0, 7.0), (1024, 4.5), (2048, 3.6), (3072, 3.3), (4096, 3.2)])
    write_run(root, "prodigy", {"name": "prodigy"},
              curve=[(0, 7.0), (1024, 5.0), (2048, 4.5), (3072, 4.0), (4096, 3.7)])
    result = build_report([root], tmp_path / "rep")
    rows = csv_rows(tmp_path / "rep")
    # target 3.6: AGD crosses it 0.8 of the way from 2,048 (4.0) to 3,072 (3.5)
    assert float(row(rows, setting="AGD default+spectral")["tokens_to_target"]) == pytest.approx(2048 + 0.8 * 1024)
    assert float(row(rows, setting="Muon")["tokens_to_target"]) == 2048.0  # exactly at an eval
    assert float(row(rows, setting="AdamW")["tokens_to_target"]) == 4096.0  # its own final eval
    assert row(rows, setting="Prodigy")["tokens_to_target"] == ""  # 3.7 at the end: never reached
    detail = {r["setting"]: r for r in table_cells(next(iter(result["details"].values())))}
    assert detail["AGD default+spectral"]["tokens to target"] == "2.87k"
    assert detail["Prodigy"]["tokens to target"] == "not reached"
    assert detail["Prodigy"]["time to target"] == "-"
    speed = {r["setting"]: r for r in table_cells(result["speed_summary"])}
    assert speed["Prodigy"]["target not reached"] == "1/1"
    assert speed["Muon"]["tokens to target / tuned AdamW's"] == f"{2048 / 4096:.3f} (n=1)"


# ---- best lr per family, cell and seed ---------------------------------------------------

# (width, seed, family) -> {lr: final val loss}; the best lr is written by hand in BEST
LOSSES = {
    (64, 0, "adamw"): {1e-3: 3.90, 3e-3: 3.70, 1e-2: 3.80},
    (64, 1, "adamw"): {1e-3: 3.90, 3e-3: 3.85, 1e-2: 3.75},
    (128, 0, "adamw"): {1e-3: 3.40, 3e-3: 3.50, 1e-2: 3.60},
    (128, 1, "adamw"): {1e-3: 3.45, 3e-3: 3.42, 1e-2: 3.70},
    (64, 0, "muon"): {1e-2: 3.65, 2e-2: 3.60, 4e-2: 3.62},
    (64, 1, "muon"): {1e-2: 3.61, 2e-2: 3.66, 4e-2: 3.70},
    (128, 0, "muon"): {1e-2: 3.40, 2e-2: 3.35, 4e-2: 3.30},
    (128, 1, "muon"): {1e-2: 3.38, 2e-2: 3.33, 4e-2: 3.39},
    (64, 0, "schedulefree"): {1.25e-3: 3.80, 2.5e-3: 3.81},
    (64, 1, "schedulefree"): {1.25e-3: 3.83, 2.5e-3: 3.79},
    (128, 0, "schedulefree"): {1.25e-3: 3.50, 2.5e-3: 3.45},
    (128, 1, "schedulefree"): {1.25e-3: 3.44, 2.5e-3: 3.46},
}
BEST = {  # (width, seed, family) -> (best lr, at the edge of 3+ lrs)
    (64, 0, "adamw"): (3e-3, False), (64, 1, "adamw"): (1e-2, True),
    (128, 0, "adamw"): (1e-3, True), (128, 1, "adamw"): (3e-3, False),
    (64, 0, "muon"): (2e-2, False), (64, 1, "muon"): (1e-2, True),
    (128, 0, "muon"): (4e-2, True), (128, 1, "muon"): (2e-2, False),
    (64, 0, "schedulefree"): (1.25e-3, False), (64, 1, "schedulefree"): (2.5e-3, False),  # 2 lrs: no edge
    (128, 0, "schedulefree"): (2.5e-3, False), (128, 1, "schedulefree"): (1.25e-3, False),
}
LABEL = {"adamw": "AdamW", "muon": "Muon", "schedulefree": "Schedule-free"}


@pytest.fixture
def swept(tmp_path):
    root = tmp_path / "runs"
    for (width, seed, family), losses in LOSSES.items():
        for lr, final in losses.items():
            write_run(root, f"w{width}-s{seed}-{family}-{lr:g}", {"name": family, "lr": lr}, final=final,
                      width=width, seed=seed)
        # lower last evals that must never be chosen: a run that stopped, one that blew up
        write_run(root, f"w{width}-s{seed}-{family}-stopped", {"name": family, "lr": 0.5}, final=1.0, width=width,
                  seed=seed, done=False)
        write_run(root, f"w{width}-s{seed}-{family}-nan", {"name": family, "lr": 0.7}, final=1.1, width=width,
                  seed=seed, diverged=True)
        if family == "adamw":
            write_run(root, f"w{width}-s{seed}-agd", {"name": "agd"}, final=3.6, width=width, seed=seed)
    return root


def test_best_lr_per_family_cell_and_seed(swept, tmp_path):
    result = build_report([swept], tmp_path / "rep")
    rows = csv_rows(tmp_path / "rep")
    for (width, seed, family), (lr, edge) in BEST.items():
        r = row(rows, n_embd=str(width), seed=str(seed), setting=LABEL[family])
        assert float(r["lr"]) == lr and r["lr_at_edge"] == str(edge), (width, seed, family)
        assert float(r["final_val_loss"]) == LOSSES[(width, seed, family)][lr]
        adamw_lr = BEST[(width, seed, "adamw")][0]
        assert float(r["adamw_lr"]) == adamw_lr
        assert float(r["ratio"]) == pytest.approx(LOSSES[(width, seed, family)][lr]
                                                  / LOSSES[(width, seed, "adamw")][adamw_lr], rel=1e-12)
    matrix = {r["width"]: r for r in table_cells(result["ratio_table"])}
    assert matrix["64"]["best AdamW (final val loss @ lr, per seed)"] == "s0: 3.7000 @ 3e-3; s1: 3.7500 @ 1e-2 (edge)"
    assert matrix["128"]["best Muon (final val loss @ lr, per seed)"] == "s0: 3.3000 @ 4e-2 (edge); s1: 3.3300 @ 2e-2"
    detail = table_cells(result["details"][next(k for k in result["details"] if k.startswith("w128"))])
    assert row(detail, setting="Schedule-free", seed="1")["lr"] == "1.25e-3"
    assert row(detail, setting="Muon", seed="0")["lr"] == "4e-2 (edge)"
    # the stopped and blown-up runs are in the runs table, flagged, and never a reference
    assert "w64-s0-adamw-nan" in result["table"] and "(diverged)" in result["table"]
    assert not any(r["run"].endswith(("stopped", "nan")) for r in rows)


# ---- ratios and the grid summary ----------------------------------------------------------

# (width, seed) -> best AdamW, best Muon (None: no Muon in that cell), the AGD setting, Prodigy (None: stopped by the trainer, DIVERGED)
FINALS = {
    (64, 0): (4.00, 3.90, 3.80, 4.32), (64, 1): (4.10, 3.95, 3.90, 4.20),
    (128, 0): (3.50, 3.40, 3.45, 3.60), (128, 1): (3.60, 3.50, 3.45, 3.70),
    (192, 0): (3.20, None, 3.41, 3.30), (192, 1): (3.25, None, 3.30, None),
}


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "runs"
    for (width, seed), (adamw, muon, agd, prodigy) in FINALS.items():
        write_run(root, f"w{width}-s{seed}-adamw", {"name": "adamw", "lr": 3e-3}, final=adamw, width=width, seed=seed)
        write_run(root, f"w{width}-s{seed}-adamw-worse", {"name": "adamw", "lr": 1e-2}, final=adamw + 0.3,
                  width=width, seed=seed)
        if muon is not None:
            write_run(root, f"w{width}-s{seed}-muon", {"name": "muon", "lr": 2e-2}, final=muon, width=width, seed=seed)
            write_run(root, f"w{width}-s{seed}-muon-worse", {"name": "muon", "lr": 4e-2}, final=muon + 0.2,
                      width=width, seed=seed)
        write_run(root, f"w{width}-s{seed}-agd", {"name": "agd", "variant": "spectral_momentum"}, final=agd,
                  width=width, seed=seed)
        write_run(root, f"w{width}-s{seed}-prodigy", {"name": "prodigy"}, final=prodigy or 3.0, width=width,
                  seed=seed, done=prodigy is not None, stopped=prodigy is None)
    return root


def test_ratio_and_beats_muon_summary(grid, tmp_path):
    result = build_report([grid], tmp_path / "rep")
    summary = {r["setting"]: r for r in table_cells(result["ratio_summary"])}
    assert list(summary) == ["AGD default+spectral_momentum", "Muon", "Prodigy"]

    agd = summary["AGD default+spectral_momentum"]
    ratios = [3.80 / 4.00, 3.90 / 4.10, 3.45 / 3.50, 3.45 / 3.60, 3.41 / 3.20, 3.30 / 3.25]
    assert agd["cells"] == "3"
    assert agd["mean ratio"] == f"{sum(ratios) / 6:.3f}" and agd["worst ratio"] == "1.066"  # 3.41 / 3.20
    assert agd["within 5% of AdamW"] == "2/3"  # w192 seed 0 is 6.6% worse
    # w64: below Muon in both seeds; w128: 3.45 > 3.40 in seed 0; w192: no Muon to beat
    assert agd["beats tuned Muon"] == "1/2"
    assert agd["beats AGD default"] == "-" and agd["cells with a failed run"] == "0"

    muon = summary["Muon"]
    muon_ratios = [3.90 / 4.00, 3.95 / 4.10, 3.40 / 3.50, 3.50 / 3.60]
    assert muon["cells"] == "2" and muon["mean ratio"] == f"{sum(muon_ratios) / 4:.3f}"
    assert muon["within 5% of AdamW"] == "2/2" and muon["beats tuned Muon"] == "-"

    prodigy = summary["Prodigy"]
    assert prodigy["cells"] == "3" and prodigy["worst ratio"] == "1.080"  # 4.32 / 4.00
    # w64 is 8% worse; w128 within (1.029, 1.028); w192 seed 1 diverged: not within, whatever seed 0 did
    assert prodigy["within 5% of AdamW"] == "1/3" and prodigy["cells with a failed run"] == "1"
    assert prodigy["beats tuned Muon"] == "0/2"

    matrix = {r["width"]: r for r in table_cells(result["ratio_table"])}
    assert matrix["192"]["Prodigy"] == f"{3.30 / 3.20:.3f} ({3.30 / 3.20:.3f}, diverged)"
    assert matrix["192"]["Muon"] == ""
    assert matrix["64"]["AGD default+spectral_momentum"] == f"{(3.80 / 4.00 + 3.90 / 4.10) / 2:.3f} (0.950, 0.951)"
    detail = table_cells(result["details"][next(k for k in result["details"] if k.startswith("w128"))])
    assert row(detail, setting="AGD default+spectral_momentum", seed="0")["× tuned Muon"] == f"{3.45 / 3.40:.3f}"
    depth192 = table_cells(result["details"][next(k for k in result["details"] if k.startswith("w192"))])
    assert row(depth192, setting="Prodigy", seed="1")["final val loss"].startswith("diverged")
    # the trainer's DIVERGED marker: an ended run, shown as diverged, not as one still running
    assert "w192-s1-prodigy | " in result["table"] and "w192-s1-prodigy *" not in result["table"]


# ---- timings from a shared machine are marked, and kept apart ------------------------------

def test_timings_not_from_an_idle_machine_are_marked_or_taken_from_idle_runs_of_their_kind(tmp_path):
    """A run that shared its machine takes the idle median of its speed class (shape and
    setting: its other seeds, or --timing-runs), marked ‡; with none it keeps its own figure,
    marked †, and the summary keeps those apart."""
    root, timing_root = tmp_path / "runs", tmp_path / "timing"
    adamw_curve = [(0, 7.0), (1024, 5.0), (2048, 4.2), (3072, 3.9), (4096, 3.6)]
    agd_curve = [(0, 7.0), (1024, 5.0), (2048, 4.0), (3072, 3.5), (4096, 3.4)]  # reaches 3.6 at 2,867.2 tokens
    shared = {"idle": False, "note": "ran beside the test suite"}
    for seed in (0, 1):
        # median of 1/tokens_per_s: 1/2,000 s
        write_run(root, f"adamw-s{seed}", {"name": "adamw", "lr": 3e-3}, curve=adamw_curve, seed=seed,
                  train=[{"tokens_per_s": 1000.0}, {"tokens_per_s": 2000.0}, {"tokens_per_s": 4000.0}])
        # no rate logged: step_time_s / 1,024 tokens per step; seed 1 (idle) median 1.0 s, seed 0 (shared) 3.0 s
        times = [0.5, 1.0, 2.0] if seed else [3.0, 3.0, 3.0]
        write_run(root, f"agd-s{seed}", {"name": "agd"}, curve=agd_curve, seed=seed,
                  train=[{"step_time_s": t} for t in times], timing=shared if seed == 0 else {"idle": True})
        # no idle run of its kind anywhere: its own figure, marked
        write_run(root, f"mom-s{seed}", {"name": "agd", "variant": "momentum"}, curve=agd_curve, seed=seed,
                  train=[{"step_time_s": 1.0}], timing=shared)
        # an idle timing-only run of its kind, shorter: 1/4,096 s a token
        write_run(root, f"spec-s{seed}", {"name": "agd", "variant": "spectral"}, curve=agd_curve, seed=seed,
                  train=[{"step_time_s": 2.0}], timing=shared)
    write_run(timing_root, "spec-timing", {"name": "agd", "variant": "spectral"}, curve=[(0, 7.0), (1024, 5.0)],
              train=[{"tokens_per_s": 4096.0}], timing={"idle": True})
    # a short run beside full-length idle ones: the check table sets them side by side
    write_run(timing_root, "adamw-timing", {"name": "adamw", "lr": 1e-3}, curve=[(0, 7.0), (1024, 5.0)],
              train=[{"tokens_per_s": 2500.0}])
    result = build_report([root], tmp_path / "rep", timing_paths=[timing_root])
    assert len(result["runs"]) == 8 and len(result["cells"]) == 1  # the timing runs are no results
    check = table_cells(result["speed_check"])
    assert check == [{"shape": "w64 L2 · b16 · bytes", "setting": "AdamW", "short runs": "400 µs",
                      "full-length idle runs (n)": "500 µs (2)", "short / full": "0.800"}]
    detail = {(r["setting"], r["seed"]): r for r in table_cells(next(iter(result["details"].values())))}
    assert detail[("AdamW", "0")]["seconds per token"] == "500 µs"
    assert detail[("AdamW", "0")]["time to target"] == f"{4096 / 2000:.3g} s"
    assert detail[("AGD default", "1")]["seconds per token"] == f"{1e6 / 1024:.3g} µs"  # idle: its own
    assert detail[("AGD default", "0")]["seconds per token"] == f"{1e6 / 1024:.3g} µs‡"  # seed 1's
    assert detail[("AGD default", "0")]["time to target"] == f"{2867.2 / 1024:.3g} s‡"
    assert detail[("AGD default+momentum", "0")]["seconds per token"] == f"{1e6 / 1024:.3g} µs†"
    assert detail[("AGD default+spectral", "1")]["seconds per token"] == f"{1e6 / 4096:.3g} µs‡"
    speed = {r["setting"]: r for r in table_cells(result["speed_summary"])}
    adamw_time = 4096 / 2000
    assert speed["AGD default"]["time to target / tuned AdamW's (idle machine)"] == \
        f"{2867.2 / 1024 / adamw_time:.3f} (n=2)"
    assert speed["AGD default"]["the same, timings marked †"] == "-"
    assert speed["AGD default+momentum"]["time to target / tuned AdamW's (idle machine)"] == "-"
    assert speed["AGD default+momentum"]["the same, timings marked †"] == f"†{2867.2 / 1024 / adamw_time:.3f} (n=2)"
    assert speed["AGD default+spectral"]["time to target / tuned AdamW's (idle machine)"] == \
        f"{2867.2 / 4096 / adamw_time:.3f} (n=2)"
    md = result["report"].read_text()
    note = next(line for line in md.splitlines() if line.startswith("- ran beside the test suite:"))
    assert "mom-s0" in note and "mom-s1" in note and "agd-s0" not in note and "spec-s0" not in note
    rows = csv_rows(tmp_path / "rep")
    assert row(rows, setting="AGD default", seed="0")["timing_marked"] == "False"
    assert row(rows, setting="AGD default", seed="0")["timing_from"] == "agd-s1"
    assert row(rows, setting="AGD default+spectral", seed="0")["timing_from"] == "spec-timing"
    assert row(rows, setting="AGD default+momentum", seed="0")["timing_marked"] == "True"


def test_a_timing_file_that_is_not_one_skips_the_run_with_a_warning(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "good", {"name": "adamw", "lr": 3e-3}, final=3.6)
    write_run(root, "bad", {"name": "agd"}, final=3.5, timing={"idle": "maybe"})
    runs, warnings = read_runs([root])
    assert [r.name for r in runs] == ["good"]
    assert len(warnings) == 1 and "bad/timing.json" in warnings[0]


# ---- the third-seed rule ----------------------------------------------------------------------

def test_the_top_two_of_a_cell_within_the_seed_spread_get_a_third_seed(tmp_path):
    root = tmp_path / "runs"
    finals = {("adamw", 3e-3): (3.6, 3.7), ("adamw", 1e-3): (3.8, 3.9),
              ("muon", 1e-2): (3.30, 3.40), ("muon", 2e-2): (3.25, 3.50)}
    for (family, lr), per_seed in finals.items():
        for seed, final in enumerate(per_seed):
            write_run(root, f"{family}-{lr}-s{seed}", {"name": family, "lr": lr}, final=final, seed=seed)
    for seed, final in enumerate((3.35, 3.36)):
        write_run(root, f"agd-s{seed}", {"name": "agd", "variant": "spectral_momentum"}, final=final, seed=seed)
    # Muon per seed at its best lr: 3.25 (2e-2), 3.40 (1e-2): mean 3.325, spread 0.15; AGD 3.355,
    # spread 0.01; the gap 0.03 is within the larger spread. Muon's two-seed means: 1e-2 3.35,
    # 2e-2 3.375, so its third seed runs at 1e-2.
    # while Muon's 2e-2 has run on seed 0 only, Muon is not ranked yet (its best on seed 1 may change)
    write_run(root, "muon-4e-2-s0", {"name": "muon", "lr": 4e-2}, final=3.9, seed=0)
    tie = table_cells(build_report([root], tmp_path / "rep0")["ties_table"])[0]
    assert tie["first (mean; seeds)"].startswith("AGD") and tie["second (mean; seeds)"].startswith("AdamW")
    write_run(root, "muon-4e-2-s1", {"name": "muon", "lr": 4e-2}, final=3.9, seed=1)
    result = build_report([root], tmp_path / "rep")
    tie = table_cells(result["ties_table"])[0]
    assert tie["first (mean; seeds)"] == "Muon @ 1e-2 (3.3250; 3.2500, 3.4000)"
    assert tie["second (mean; seeds)"] == "AGD default+spectral_momentum (3.3550; 3.3500, 3.3600)"
    assert (tie["gap"], tie["larger spread"], tie["near tie"]) == ("0.0300", "0.1500", "yes")
    assert tie["decision"] == "third seed not run yet"
    # the third seed: Muon at 1e-2 (a run at 5e-3 is not the one the rule named), and AGD
    write_run(root, "muon-1e-2-s2", {"name": "muon", "lr": 1e-2}, final=3.50, seed=2)
    write_run(root, "muon-5e-3-s2", {"name": "muon", "lr": 5e-3}, final=3.00, seed=2)
    write_run(root, "agd-s2", {"name": "agd", "variant": "spectral_momentum"}, final=3.30, seed=2)
    result = build_report([root], tmp_path / "rep2")
    tie = table_cells(result["ties_table"])[0]
    muon3, agd3 = (3.25 + 3.40 + 3.50) / 3, (3.35 + 3.36 + 3.30) / 3
    assert tie["decision"] == (f"AGD default+spectral_momentum by {muon3 - agd3:.4f} over three seeds "
                               f"({agd3:.4f} vs {muon3:.4f})")
    # the seed-2 runs have no tuned AdamW to be a ratio against: the cell's seeds stay 0 and 1,
    # even with an AdamW at one lr on seed 2 (as when AdamW is one of a cell's top two)
    write_run(root, "adamw-3e-3-s2", {"name": "adamw", "lr": 3e-3}, final=3.65, seed=2)
    result = build_report([root], tmp_path / "rep3")
    assert "| 2 |" not in next(iter(result["details"].values()))
    assert table_cells(result["ties_table"])[0]["decision"].startswith("AGD default+spectral_momentum by")


def test_top_two_apart_by_more_than_their_spread_need_no_third_seed(tmp_path):
    root = tmp_path / "runs"
    for seed, (adamw, agd) in enumerate(((3.6, 3.4), (3.62, 3.41))):
        write_run(root, f"adamw-s{seed}", {"name": "adamw", "lr": 3e-3}, final=adamw, seed=seed)
        write_run(root, f"agd-s{seed}", {"name": "agd"}, final=agd, seed=seed)
    tie = table_cells(build_report([root], tmp_path / "rep")["ties_table"])[0]
    assert (tie["gap"], tie["larger spread"], tie["near tie"]) == ("0.2050", "0.0200", "no")
    assert tie["decision"] == "no third seed needed"
