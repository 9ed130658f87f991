"""Build the report folder: read the runs, compare them, write the CSVs, the PNGs and report.md."""

from __future__ import annotations

from pathlib import Path

from agdlm.report.compare import compare_cells, duplicate_runs, summarise
from agdlm.report.compare_tables import (detail_markdown, gain_markdown, marked_notes, ratio_markdown,
                                         speed_markdown, summary_markdown, write_comparison_csv)
from agdlm.report.document import report_lines
from agdlm.report.plots.agd import plot_agd_eta, plot_agd_roles
from agdlm.report.plots.curves import plot_val_loss
from agdlm.report.plots.lr import plot_gain_sensitivity, plot_lr_transfer
from agdlm.report.plots.scaling import plot_compute_scaling
from agdlm.report.roles import role_final_rows, role_markdown, write_role_csv
from agdlm.report.runs import NoRuns, RunLog, read_runs
from agdlm.report.scaling import scaling_groups
from agdlm.report.scaling_table import SCALING_NOTE, scaling_markdown
from agdlm.report.tables import downstream_markdown, markdown_table, table_rows, write_csv
from agdlm.report.ties import ties_markdown, top_two
from agdlm.report.timing import SpeedBook, checks_markdown

PLOTS = {
    "val_loss_vs_tokens.png": (plot_val_loss, "Validation loss against tokens seen, per cell"),
    "lr_transfer.png": (plot_lr_transfer, "Learning-rate transfer: final val loss against lr, one line per cell"),
    "gain_sensitivity.png": (plot_gain_sensitivity, "AGD's gain beside AdamW's and Muon's learning rate"),
    "compute_scaling.png": (plot_compute_scaling, "Final val loss against training compute"),
    "agd_eta.png": (plot_agd_eta, "AGD's step size eta and G over training"),
    "agd_roles.png": (plot_agd_roles, "AGD diagnostics per role: share of G, update size, weight growth"),
}
COMPARISON_CSV = "vs_adamw.csv"


def write_outputs(runs: list[RunLog], out: Path, timing_runs: list[RunLog] = ()) -> dict:
    """Every file of the report folder but report.md; the tables report.md and W&B show."""
    out.mkdir(parents=True, exist_ok=True)
    speeds = SpeedBook(runs, timing_runs)
    cells = compare_cells(runs, speeds)
    plots = [name for name, (fn, _) in PLOTS.items() if fn(runs, cells, out / name)]
    write_csv(runs, out / "runs.csv")
    if cells:
        write_comparison_csv(cells, out / COMPARISON_CSV)
    roles = role_final_rows(runs)
    if roles:
        write_role_csv(roles, out / "agd_roles.csv")
    summaries = summarise(cells)
    main_cells = [c for c in cells if len(c.settings) > 1]  # not cells holding only gain runs
    groups = scaling_groups(cells)
    return {
        "cells": cells, "plots": plots,
        "table": markdown_table(table_rows(runs)),
        "downstream": downstream_markdown(runs),
        "ratio_table": ratio_markdown(main_cells) if main_cells else None,
        "ratio_summary": summary_markdown(summaries) if main_cells else None,
        "speed_summary": speed_markdown(summaries) if main_cells else None,
        "details": {c.cell.label: detail_markdown(c) for c in main_cells},
        "ties_table": ties_markdown(top_two(main_cells, runs)),
        "marked": marked_notes(cells),
        "speed_check": checks_markdown(speeds),
        "borrowed": any(e.borrowed for c in cells for per_seed in c.entries.values() for e in per_seed.values()),
        "gain_table": gain_markdown(cells),
        "scaling_table": scaling_markdown(groups) if groups else None,
        "scaling_note": SCALING_NOTE,
        "roles_table": role_markdown(roles) if roles else None,
    }


def build_report(paths: list[str | Path], out: str | Path, title: str | None = None,
                 timing_paths: list[str | Path] = ()) -> dict:
    """Write the report folder; returns what it wrote (tables as markdown, plot paths, report,
    warnings, runs, cells). A run that cannot be read is left out with a warning; none readable
    is NoRuns. Runs under `timing_paths` give idle seconds per token only (agdlm.report.timing)."""
    runs, warnings = read_runs(paths)
    timing_runs, timing_warnings = read_runs(timing_paths) if timing_paths else ([], [])
    warnings += timing_warnings
    if not runs:
        found = f" ({'; '.join(warnings)})" if warnings else ""
        raise NoRuns(f"no readable runs (folders with metrics.jsonl) in {', '.join(map(str, paths))}{found}")
    warnings += duplicate_runs(runs)
    out = Path(out)
    written = write_outputs(runs, out, timing_runs)
    groups = sorted({str(r.config.get("log", {}).get("group")) for r in runs if r.config.get("log", {}).get("group")})
    title = title or f"agdlm report: {', '.join(groups) if groups else ', '.join(str(p) for p in paths)}"
    intro = (f"{len(runs)} run(s) from {', '.join(f'`{p}`' for p in paths)}; written by `agdlm report` from each "
             "run's config.yaml and metrics.jsonl.")
    drawn = {name: PLOTS[name][1] for name in written["plots"]}
    lines = report_lines(title, intro, written, drawn, warnings, [r.name for r in runs if not r.ended])
    missing = [text for name, (_, text) in PLOTS.items() if name not in drawn]
    if missing:
        lines += ["", "Not drawn (no data for them in these runs): " + "; ".join(missing) + "."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return {**written, "runs": runs, "plots": [out / p for p in written["plots"]], "report": report,
            "warnings": warnings, "title": title}
