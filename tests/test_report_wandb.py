"""`agdlm report --wandb offline`: the comparison as one W&B run, decoded from its offline
transaction log (as tests/test_wandb_sink.py does) and its table files; `agdlm eval`
results appear in the report when a run has them."""

import json
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from agdlm.eval_results import record_results  # noqa: E402
from agdlm.report.cli import main  # noqa: E402
from agdlm.report.runs import find_runs  # noqa: E402
from tests.test_report import write_run  # noqa: E402
from tests.test_wandb_sink import decode, offline_runs, read_wandb_records  # noqa: E402


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs" / "fixture"
    common = ["model.n_embd=64", "model.n_head=2"]
    agd = write_run(root, "w64-agd-s0", common + ["optim.name=agd"], final_shift=0.3)
    for k, lr in enumerate((1e-3, 3e-3)):
        write_run(root, f"w64-adamw-lr{lr:g}-s0", common + ["optim.name=adamw", f"optim.lr={lr}", "optim.min_lr=0"],
                  final_shift=0.1 * k)
    record_results(agd / "eval.json", "loss", "data/owt-val", {"val_loss": 3.25, "perplexity": 25.8})
    record_results(agd / "eval.json", "choice", "hellaswag_val.jsonl", {"acc_norm": 0.5, "acc": 0.25})
    return root


def table_rows(run_files: Path, key: str) -> list[dict]:
    path = next(run_files.glob(f"media/table/{key}_*.table.json"))
    table = json.loads(path.read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_report_logs_one_offline_summary_run(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "report"
    assert main([str(runs_dir), "-o", str(out), "--wandb", "offline"]) == 0

    logs = offline_runs(out)
    assert len(logs) == 1
    run, config, history, _, summary = decode(read_wandb_records(logs[0]))
    assert run.job_type == "report" and run.run_group == "fixture" and run.project == "agdlm"
    assert config["runs"] == [r.name for r in find_runs([runs_dir])]
    logged = history[0]
    for key in ("comparison/runs", "comparison/val_loss_curves", "comparison/vs_adamw", "comparison/ratios",
                "comparison/summary", "comparison/speed", "comparison/details", "comparison/agd_roles",
                "comparison/val_loss_vs_tokens_table", "comparison/lr_transfer_table"):
        assert logged[f"{key}/_type"] == "table-file", key
    for plot in ("val_loss_vs_tokens", "lr_transfer", "agd_eta", "agd_roles"):
        assert logged[f"plots/{plot}/_type"] == "image-file" and (logs[0].parent / "files" /
                                                                  logged[f"plots/{plot}/path"]).is_file()
    chart = config["_wandb/visualize/comparison/val_loss_vs_tokens"]["panel_config"]
    assert chart["panelDefId"] == "wandb/line/v0"
    assert chart["fieldSettings"] == {"x": "tokens", "y": "val_loss", "stroke": "run"}

    files = logs[0].parent / "files"
    rows = {row["run"]: row for row in table_rows(files, "comparison/runs")}
    for r in find_runs([runs_dir]):
        assert rows[r.name]["final_val_loss"] == pytest.approx(r.final_val_loss)
        assert rows[r.name]["best_val_loss"] == pytest.approx(r.best_val_loss)
    assert rows["w64-agd-s0"]["eval loss owt-val"] == 3.25 and rows["w64-agd-s0"]["hellaswag_val acc_norm"] == 0.5
    assert rows["w64-adamw-lr0.001-s0"]["eval loss owt-val"] is None
    curves = table_rows(files, "comparison/val_loss_curves")
    assert {c["run"] for c in curves} == {"AGD · w64-agd-s0", "AdamW · w64-adamw-lr0.001-s0",
                                          "AdamW · w64-adamw-lr0.003-s0"}
    transfer = table_rows(files, "comparison/lr_transfer_table")  # one series per swept family and cell
    cell = find_runs([runs_dir])[0].cell.label
    assert [(t["series"], t["lr"]) for t in transfer] == [(f"AdamW · {cell}", 1e-3), (f"AdamW · {cell}", 3e-3)]
    assert [t["final_val_loss"] for t in transfer] == [rows[f"w64-adamw-lr{lr:g}-s0"]["final_val_loss"]
                                                       for lr in (1e-3, 3e-3)]
    # the same tables as report.md
    md = (out / "report.md").read_text()
    for key in ("comparison/ratios", "comparison/summary", "comparison/speed"):
        logged_rows = table_rows(files, key)
        assert logged_rows and all(" | ".join(map(str, r.values())) in md for r in logged_rows), key
    details = table_rows(files, "comparison/details")
    assert {d["setting"] for d in details} == {"AdamW", "AGD default"} and details[0]["cell"] == cell
    assert summary["runs"] == 3


def test_report_shows_eval_results_without_wandb(runs_dir, tmp_path):
    out = tmp_path / "report"
    assert main([str(runs_dir), "-o", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Downstream evaluation (`agdlm eval`)" in text
    assert "| w64-agd-s0 | AGD | 3.2500 | 0.5000 |" in text
    assert not (out / "wandb").exists()
    header = (out / "runs.csv").read_text().splitlines()[0]
    assert header.endswith("eval loss owt-val,hellaswag_val acc_norm")


def test_report_run_carries_the_top_two_table(tmp_path, monkeypatch):
    """With two seeds the report ranks each cell's top two (the third-seed rule); the W&B
    comparison run carries that table as report.md shows it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "runs" / "fixture"
    common = ["model.n_embd=64", "model.n_head=2"]
    for seed in (0, 1):
        seeds = [f"train.seed={seed}"]
        write_run(root, f"agd-s{seed}", common + seeds + ["optim.name=agd"], final_shift=0.2 + 0.1 * seed)
        write_run(root, f"adamw-s{seed}", common + seeds + ["optim.name=adamw", "optim.lr=3e-3"], final_shift=0.3)
    out = tmp_path / "report"
    assert main([str(root), "-o", str(out), "--wandb", "offline"]) == 0
    logs = offline_runs(out)
    rows = table_rows(logs[0].parent / "files", "comparison/top_two")
    assert len(rows) == 1 and rows[0]["first (mean; seeds)"].startswith("AdamW @ 3e-3")
    assert rows[0]["near tie"] == "yes"  # the gap 0.05 is within AGD's seed spread, 0.1
    assert " | ".join(map(str, rows[0].values())) in (out / "report.md").read_text()
