"""The table of every run (report.md, runs.csv) and the `agdlm eval` results some runs have."""

from __future__ import annotations

import csv
from pathlib import Path

from agdlm.report.markdown import fmt_loss, table
from agdlm.report.optimisers import family_label
from agdlm.report.runs import RunLog, fmt_count
from agdlm.sweep import short_number

COLUMNS = ["run", "optimiser", "lr", "params", "tokens", "final val loss", "best val loss", "tokens/s"]
RUNS_NOTE = ("lr: the peak learning rate of the lr-swept optimisers (AGD and Prodigy have none to tune). "
             "params: all parameters, tied weights once. tokens: tokens seen at the last record. tokens/s: "
             "median over logged intervals.")


def optimiser_text(run: RunLog) -> str:
    """`AdamW`, `Muon`, `AGD`, or `AGD (default+spectral)` when not the faithful default policy."""
    label = run.agd_label
    if label is not None:
        return "AGD" if label == "default" else f"AGD ({label})"
    return run.setting if run.optimiser == "prodigy" else family_label(run.optimiser)


def table_rows(runs: list[RunLog]) -> list[dict]:
    return [{
        "run": r.name + ("" if r.ended else " *"),
        "optimiser": optimiser_text(r),
        "lr": short_number(r.lr) if r.lr is not None else "-",
        "params": fmt_count(r.params),
        "tokens": fmt_count(r.tokens),
        "final val loss": fmt_loss(r.final_val_loss) + (" (diverged)" if r.diverged else ""),
        "best val loss": fmt_loss(r.best_val_loss),
        "tokens/s": f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "",
    } for r in runs]


def markdown_table(rows: list[dict]) -> str:
    return table(COLUMNS, [[row[c] for c in COLUMNS] for row in rows], left=(0, 1))


def downstream_columns(runs: list[RunLog]) -> list[str]:
    """The `agdlm eval` results some run has (eval.json), in first-seen order."""
    return list(dict.fromkeys(column for r in runs for column in r.downstream))


def write_csv(runs: list[RunLog], path: Path) -> None:
    extra = downstream_columns(runs)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "finished", "optimiser", "setting", "lr", "n_layer", "n_embd", "seed", "params", "tokens",
                    "final_val_loss", "best_val_loss", "tokens_per_s", "seconds_per_token", "timing_idle", "run_dir",
                    *extra])
        for r in runs:
            w.writerow([r.name, r.done, r.optimiser, r.setting, r.lr if r.lr is not None else "", r.depth, r.width,
                        r.seed, r.params or "", r.tokens, r.final_val_loss, r.best_val_loss, r.tokens_per_s,
                        r.seconds_per_token, r.timed_idle, str(r.path), *(r.downstream.get(c, "") for c in extra)])


def downstream_markdown(runs: list[RunLog]) -> str | None:
    """One row per run with `agdlm eval` results: val loss on a shared source, choice accuracy."""
    columns = downstream_columns(runs)
    if not columns:
        return None
    rows = [[r.name, optimiser_text(r), *(f"{r.downstream[c]:.4f}" if c in r.downstream else "" for c in columns)]
            for r in runs if r.downstream]
    return table(["run", "optimiser", *columns], rows, left=(0, 1))
