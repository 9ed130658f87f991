"""`agdlm report` from fixture runs (config.yaml + metrics.jsonl written here): every plot,
the table, the numbers in it, and runs that are unfinished or lack data."""

import csv
import json
import math
from pathlib import Path

import pytest

from agdlm.config import config_to_yaml, load_config
from agdlm.report import build_report, find_runs, main

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
    assert names == ["agd_eta.png", "lr_transfer.png", "val_loss_vs_tokens.png"]
    for p in result["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = (out / "report.md").read_text()
    for name in names:
        assert f"]({name})" in md  # embedded by a relative link: the folder is self-contained
    header = "| run | optimiser | lr | params | tokens | final val loss | best val loss | tokens/s |"
    assert header in md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| w")}
    assert len(rows) == 9
    # width then AGD first then lr ascending
    order = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines() if line.startswith("| w")]
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
    assert not (out / "agd_eta.png").exists()
    assert "Not drawn" in (out / "report.md").read_text()
    assert main([str(tmp_path / "nothing-here")]) == 2


def test_report_on_real_runs(tiny_overrides, tmp_path):
    """Two real (tiny, 2-step) runs: the report reads what the trainer wrote."""
    from agdlm.train import train

    for opt in (["optim.name=agd", "train.run_name=real-agd"],
                ["optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=1", "train.run_name=real-adamw"]):
        train(load_config(None, tiny_overrides + opt + ["train.max_steps=2", "train.eval_interval=2"]))
    result = build_report([tmp_path / "runs"], tmp_path / "rep")
    assert len(result["runs"]) == 2 and len(result["plots"]) == 3
    assert all(r.done and math.isfinite(r.final_val_loss) for r in result["runs"])
