"""`agdlm report` from fixture runs (config.yaml + metrics.jsonl written here): every plot,
the table, the numbers in it, and runs that are unfinished or lack data."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from agdlm.config import config_to_yaml, load_config
from agdlm.report.build import build_report
from agdlm.report.cli import main
from agdlm.report.runs import find_runs

WIDTHS = (64, 128)
LRS = (1e-3, 3e-3, 1e-2)


def write_run(root: Path, name: str, overrides: list[str], steps=(0, 10, 20), done=True, final_shift=0.0):
    cfg = load_config(None, ["model.n_layer=2", "model.block_size=64", "train.global_batch_size=16",
                             "train.micro_batch_size=16", "log.group=fixture", f"train.run_name={name}"] + overrides)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    tokens_per_step = 16 * 64
    records = []
    for i, step in enumerate(steps):
        tokens = step * tokens_per_step
        if step:
            rec = {"step": step, "tokens": tokens, "kind": "train", "train_loss": 6.0 - i, "tokens_per_s": 1000.0 * i,
                   "step_time_s": 1.0}
            if cfg.optim.name == "agd":
                rec.update({"agd_eta": 0.1 * i, "agd_G": 1.0 + i, "agd_share/matrix": 0.5})
            else:
                rec["lr"] = cfg.optim.lr
            records.append(rec)
        records.append({"step": step, "tokens": tokens, "kind": "eval", "val_loss": 7.0 - i - final_shift})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 99, "tok')
    if done:
        (run / "DONE").write_text("done\n")
    return run


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "runs" / "fixture"
    for w in WIDTHS:
        common = [f"model.n_embd={w}", "model.n_head=2"]
        write_run(root, f"w{w}-agd-s0", common + ["optim.name=agd"], final_shift=0.05 * (w == 128))
        for k, lr in enumerate(LRS):
            write_run(root, f"w{w}-adamw-lr{lr:g}-s0", common + ["optim.name=adamw", f"optim.lr={lr}", "optim.min_lr=0"],
                      final_shift=0.1 * k)
    write_run(root, "w64-adamw-lr3e-2-s0", ["model.n_embd=64", "model.n_head=2", "optim.name=adamw",
                                             "optim.lr=3e-2", "optim.min_lr=0"], steps=(0, 10), done=False)
    (root / "slurm").mkdir()  # not a run: ignored
    return root


def test_report_has_every_plot_and_the_table(sweep_dir, tmp_path):
    out = tmp_path / "report"
    result = build_report([sweep_dir], out)
    names = sorted(p.name for p in result["plots"])
    # widths 64 and 128 of one cell otherwise: a scaling group (too few widths for a fit)
    assert names == ["agd_eta.png", "agd_roles.png", "compute_scaling.png", "lr_transfer.png", "val_loss_vs_tokens.png"]
    for p in result["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = (out / "report.md").read_text()
    for name in names:
        assert f"]({name})" in md  # embedded by a relative link: the folder is self-contained
    header = "| run | optimiser | lr | params | tokens | final val loss | best val loss | tokens/s |"
    assert header in md
    runs_table = next(block for block in md.split("\n\n") if block.startswith(header)).splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in runs_table if line.startswith("| w")}
    assert len(rows) == 9
    # width then AGD first then lr ascending
    order = [line.split(" | ")[0].lstrip("| ") for line in runs_table if line.startswith("| w")]
    assert order[:5] == ["w64-agd-s0", "w64-adamw-lr0.001-s0", "w64-adamw-lr0.003-s0", "w64-adamw-lr0.01-s0",
                         "w64-adamw-lr3e-2-s0 *"]
    cells = [c.strip() for c in rows["w128-adamw-lr0.01-s0"].strip("|").split("|")]
    assert cells[1:3] == ["AdamW", "1e-2"]
    assert cells[4] == "20.5k"  # 20 steps x 1,024 tokens
    assert cells[5] == f"{7.0 - 2 - 0.2:.4f}" and cells[6] == cells[5]
    assert cells[7] == "1,500"  # median of 1,000 and 2,000
    agd = [c.strip() for c in rows["w128-agd-s0"].strip("|").split("|")]
    assert agd[1:3] == ["AGD", "-"] and agd[5] == f"{5.0 - 0.05:.4f}"
    assert agd[3].endswith("M")  # params from the config's model (vocab 50,257 x 128 dominates)
    assert "not finished (no DONE marker): w64-adamw-lr3e-2-s0" in md

    with open(out / "runs.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and {r["optimiser"] for r in table} == {"agd", "adamw"}


def test_runs_read_back_exactly(sweep_dir):
    runs = {r.name: r for r in find_runs([sweep_dir])}
    r = runs["w64-adamw-lr0.003-s0"]
    assert r.lr == 3e-3 and r.width == 64 and r.optimiser == "adamw" and r.done
    assert r.final_val_loss == pytest.approx(4.9) and r.best_val_loss == pytest.approx(4.9) and r.tokens == 20480
    assert len(r.records) == 5  # the cut last line is skipped
    assert runs["w64-adamw-lr3e-2-s0"].done is False


def test_report_cli_on_single_runs_and_without_agd(sweep_dir, tmp_path, capsys):
    out = tmp_path / "only-adamw"
    rc = main([str(sweep_dir / "w64-adamw-lr0.001-s0"), str(sweep_dir / "w128-adamw-lr0.001-s0"), "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| w64-adamw-lr0.001-s0 | AdamW |" in printed and "lr_transfer.png" in printed
    assert not (out / "agd_eta.png").exists() and not (out / "agd_roles.png").exists()
    assert not (out / "vs_adamw.csv").exists() and "best-tuned AdamW" not in printed
    md = (out / "report.md").read_text()
    assert "Not drawn" in md and "against the best-tuned AdamW" not in md
    assert main([str(tmp_path / "nothing-here")]) == 2


def test_report_on_real_runs(tiny_overrides, tmp_path):
    """Two real (tiny, 2-step) runs: the report reads what the trainer wrote."""
    from agdlm.train import train

    for opt in (["optim.name=agd", "train.run_name=real-agd"],
                ["optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=1", "train.run_name=real-adamw"]):
        train(load_config(None, tiny_overrides + opt + ["train.max_steps=2", "train.eval_interval=2"]))
    result = build_report([tmp_path / "runs"], tmp_path / "rep")
    assert len(result["runs"]) == 2 and len(result["plots"]) == 4
    assert all(r.done and math.isfinite(r.final_val_loss) for r in result["runs"])
    # the per-role diagnostics come from what AGD really logs
    roles = {row["role"] for row in csv.DictReader(open(tmp_path / "rep" / "agd_roles.csv"))}
    assert roles and all(row.startswith("| default | real-agd |") for row in result["roles_table"].splitlines()[2:])
    ratio = [c.strip() for c in result["ratio_table"].splitlines()[2].strip("|").split("|")]
    by_optimiser = {r.optimiser: r for r in result["runs"]}
    agd, adamw = by_optimiser["agd"], by_optimiser["adamw"]
    assert ratio[5] == f"{agd.final_val_loss / adamw.final_val_loss:.3f} (seed {agd.seed} only)"


# ---- the study tables: AGD against the best AdamW per cell and seed; per-role diagnostics ---

ADAMW_PENALTY = {1e-3: 0.3, 3e-3: 0.05, 1e-2: 0.1}
AGD_PENALTY = {"default": 0.4, "agd_exp": 0.3, "default+momentum": 0.1}
ROLE_VALUES = {"agd_share": {"embedding": 0.6, "block": 0.3, "head": 0.1},
               "agd_rel_update": {"embedding": 1e-3, "block": 1e-2, "head": 3e-3},
               "agd_weight_ratio": {"embedding": 1.01, "block": 1.2, "head": 0.99}}


def role_value(metric: str, role: str, step: int, label: str) -> float:
    return ROLE_VALUES[metric][role] * (1 + step / 100) * (1 + list(AGD_PENALTY).index(label))


def write_study_run(root: Path, name: str, overrides: list[str], final_loss: float, done=True, variant=None,
                    roles_label=None, weight_ratio=True):
    cfg = yaml.safe_load(config_to_yaml(load_config(None, [
        "model.n_layer=2", "model.n_head=2", "model.block_size=64", "train.micro_batch_size=16",
        "train.max_steps=20", "log.group=study", f"train.run_name={name}"] + overrides)))
    if variant:  # written as a study run records it (the variant names are another part's)
        cfg["optim"]["variant"] = variant
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    tokens_per_step = cfg["train"]["global_batch_size"] * 64
    records = []
    for step, val_loss in ((0, 7.0), (10, 6.0), (20, final_loss)):
        if step:
            rec = {"step": step, "tokens": step * tokens_per_step, "kind": "train", "train_loss": val_loss}
            for metric in ROLE_VALUES if roles_label else ():
                if metric != "agd_weight_ratio" or weight_ratio:
                    rec.update({f"{metric}/{role}": role_value(metric, role, step, roles_label)
                                for role in ROLE_VALUES[metric]})
            records.append(rec)
        records.append({"step": step, "tokens": step * tokens_per_step, "kind": "eval", "val_loss": val_loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (run / "DONE").write_text("done\n")


@pytest.fixture
def study(tmp_path):
    """Widths 64/128 x batches 16/32 x seeds 0/1; AdamW at 3 lrs, AGD default and agd_exp
    everywhere, default+momentum at width 128. Returns (folder, finals) with finals[cell][seed]
    = {lr or AGD label: final val loss} of the finished runs."""
    root = tmp_path / "study"
    finals: dict = {}
    for width in (64, 128):
        for batch in (16, 32):
            for seed in (0, 1):
                base = 4.0 - 0.1 * (width == 128) - 0.05 * (batch == 32) + 0.01 * seed
                common = [f"model.n_embd={width}", f"train.global_batch_size={batch}", f"train.seed={seed}"]
                tag = f"w{width}-b{batch}"
                mine = finals.setdefault((width, batch), {}).setdefault(seed, {})
                penalty = dict(ADAMW_PENALTY)
                if (width, batch, seed) == (64, 16, 1):  # this seed's best lr differs
                    penalty = {1e-3: 0.3, 3e-3: 0.2, 1e-2: 0.02}
                if (width, batch, seed) == (64, 32, 1):
                    penalty = {}  # no AdamW for this seed: its AGD runs have nothing to compare with
                for lr, pen in penalty.items():
                    mine[lr] = base + pen
                    write_study_run(root, f"{tag}-adamw-lr{lr:g}-s{seed}", common + [
                        "optim.name=adamw", f"optim.lr={lr}", "optim.min_lr=0"], mine[lr])
                # an unfinished AdamW run with a lower last eval is no reference
                write_study_run(root, f"{tag}-adamw-lr3e-2-s{seed}", common + [
                    "optim.name=adamw", "optim.lr=3e-2", "optim.min_lr=0"], base - 1.0, done=False)
                for label, pen in AGD_PENALTY.items():
                    if label == "default+momentum" and width != 128:
                        continue
                    policy, _, variant = label.partition("+")
                    mine[label] = base + pen + 0.007 * seed
                    write_study_run(root, f"{tag}-agd-{label.replace('+', '-')}-s{seed}", common + [
                        "optim.name=agd", f"optim.policy={policy}"], mine[label], variant=variant or None,
                        roles_label=label, weight_ratio=label != "default")
    return root, finals


def expected_ratios(finals) -> dict:
    """(width, batch) -> AGD label -> seed -> ratio, computed straight from the written losses."""
    out: dict = {}
    for cell, seeds in finals.items():
        for seed, losses in seeds.items():
            adamw = [v for k, v in losses.items() if isinstance(k, float)]
            for label, loss in losses.items():
                if isinstance(label, str) and adamw:
                    out.setdefault(cell, {}).setdefault(label, {})[seed] = loss / min(adamw)
    return out


def table_cells(markdown: str) -> list[dict]:
    lines = markdown.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_ratio_table_against_an_independent_computation(study, tmp_path):
    root, finals = study
    result = build_report([root], tmp_path / "rep")
    expected = expected_ratios(finals)
    rows = table_cells(result["ratio_table"])
    assert list(rows[0])[:5] == ["width", "layers", "batch", "tokenizer", "tokens"]
    assert list(rows[0])[5:8] == ["AGD default", "AGD agd_exp", "AGD default+momentum"]
    assert len(rows[0]) == 9  # no Muon ran: no best-Muon column
    assert [(int(r["width"]), int(r["batch"])) for r in rows] == [(64, 16), (64, 32), (128, 16), (128, 32)]
    for row in rows:
        cell = (int(row["width"]), int(row["batch"]))
        assert row["layers"] == "2" and row["tokenizer"] == "gpt2"
        assert row["tokens"] == f"{20 * cell[1] * 64 / 1e3:.3g}k"
        for label in AGD_PENALTY:
            per_seed = expected[cell].get(label)
            if per_seed is None:
                assert row[f"AGD {label}"] == ""
                continue
            mean = sum(per_seed.values()) / len(per_seed)
            if len(per_seed) == 1:
                assert row[f"AGD {label}"] == f"{mean:.3f} (seed 0 only)"
            else:
                assert row[f"AGD {label}"] == f"{mean:.3f} ({per_seed[0]:.3f}, {per_seed[1]:.3f})"
    # the per-seed best AdamW differs where its lrs' order differs
    # the per-seed best AdamW differs where its lrs' order differs; 1e-2 is the largest of the
    # three finished lrs, so a better lr may lie above it: (edge)
    best = rows[0]["best AdamW (final val loss @ lr, per seed)"]
    assert best == f"s0: {finals[(64, 16)][0][3e-3]:.4f} @ 3e-3; s1: {finals[(64, 16)][1][1e-2]:.4f} @ 1e-2 (edge)"

    with open(tmp_path / "rep" / "vs_adamw.csv") as f:
        long = [r for r in csv.DictReader(f) if r["setting"] != "AdamW"]
    assert len(long) == sum(len(s) for labels in expected.values() for s in labels.values())
    for r in long:
        cell = (int(r["n_embd"]), int(r["global_batch_size"]))
        label = r["setting"].removeprefix("AGD ")
        assert float(r["ratio"]) == pytest.approx(expected[cell][label][int(r["seed"])], rel=1e-12)
        assert float(r["final_val_loss"]) / float(r["adamw_final_val_loss"]) == pytest.approx(float(r["ratio"]))
        assert r["adamw_run"] != f"w{cell[0]}-b{cell[1]}-adamw-lr3e-2-s{r['seed']}"  # unfinished: never the reference
    md = result["report"].read_text()
    assert "## Every optimiser setting against the best-tuned AdamW" in md and result["ratio_table"] in md


def test_grid_summary_against_an_independent_computation(study, tmp_path):
    # the study's decision rule: per AGD setting, mean/worst over (cell, seed) ratios, cells
    # within 5% of AdamW in every seed, cells where every seed beats the faithful default's
    root, finals = study
    result = build_report([root], tmp_path / "rep")
    expected = expected_ratios(finals)
    rows = {r["setting"].removeprefix("AGD "): r for r in table_cells(result["ratio_summary"])}
    assert set(rows) == set(AGD_PENALTY)
    for label in AGD_PENALTY:
        cells = {cell: labels[label] for cell, labels in expected.items() if label in labels}
        values = [x for per_seed in cells.values() for x in per_seed.values()]
        row = rows[label]
        assert row["cells"] == str(len(cells))
        assert row["mean ratio"] == f"{sum(values) / len(values):.3f}"
        assert row["worst ratio"] == f"{max(values):.3f}"
        within = sum(all(x <= 1.05 for x in per_seed.values()) for per_seed in cells.values())
        assert row["within 5% of AdamW"] == f"{within}/{len(cells)}"
        assert row["beats tuned Muon"] == "-"  # no Muon ran
        if label == "default":
            assert row["beats AGD default"] == "-"
        else:
            compared = [cell for cell in cells if "default" in expected[cell]]
            beats = sum(all(cells[cell][s] < expected[cell]["default"][s] for s in cells[cell]
                            if s in expected[cell]["default"]) for cell in compared)
            assert row["beats AGD default"] == f"{beats}/{len(compared)}"
    assert result["ratio_summary"] in result["report"].read_text()


def test_per_role_diagnostics_plot_and_final_values(study, tmp_path):
    root, _ = study
    result = build_report([root], tmp_path / "rep")
    assert (tmp_path / "rep" / "agd_roles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table_cells(result["roles_table"])
    assert [r["AGD"] for r in rows] == ["default"] * 3 + ["agd_exp"] * 3 + ["default+momentum"] * 3
    for r in rows:  # the widest cell's first seed; batch 16 before 32 by name
        label = r["AGD"]
        assert r["run"] == f"w128-b16-agd-{label.replace('+', '-')}-s0"
        for metric, header in (("agd_share", "share of G"), ("agd_rel_update", "update size ‖dW‖/‖W‖"),
                               ("agd_weight_ratio", "weight growth ‖W‖/‖W0‖")):
            if metric == "agd_weight_ratio" and label == "default":  # an older run: not logged
                assert r[header] == "-"
            else:
                assert r[header] == f"{role_value(metric, r['role'], 20, label):.4g}"
    with open(tmp_path / "rep" / "agd_roles.csv") as f:
        assert len(list(csv.DictReader(f))) == 9
    md = result["report"].read_text()
    assert "](agd_roles.png)" in md and result["roles_table"] in md
    # every earlier output is still written
    for name in ("report.md", "runs.csv", "vs_adamw.csv", "val_loss_vs_tokens.png", "lr_transfer.png"):
        assert (tmp_path / "rep" / name).is_file()


def test_report_cli_prints_the_ratio_table(study, tmp_path, capsys):
    root, _ = study
    assert main([str(root), "-o", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "Final val loss / best-tuned AdamW's" in printed and "| 128 | 2 | 32 | gpt2 |" in printed
