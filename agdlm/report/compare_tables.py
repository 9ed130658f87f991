"""The comparison as tables: the ratio matrix (cells x settings), the per-cell detail (tokens
and time to the tuned AdamW's loss), the grid summaries, AGD's gain sensitivity, and the long
CSV behind them (vs_adamw.csv)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from agdlm.report.compare import WITHIN, CellComparison, Entry, Summary, gain_curves
from agdlm.report.markdown import (DAGGER, fmt_duration, fmt_loss, fmt_ratio, fmt_seconds_per_token, fmt_tokens,
                                   table)
from agdlm.report.optimisers import FAITHFUL_AGD, MUON, REFERENCE, family_label, setting_order
from agdlm.report.runs import RunLog, fmt_count
from agdlm.sweep import short_number

ADAMW, MUON_LABEL = family_label(REFERENCE), family_label(MUON)
CELL_HEAD = ["width", "layers", "batch", "tokenizer", "tokens"]


def cell_columns(c: CellComparison) -> list[str]:
    cell = c.cell
    return [str(cell.width), str(cell.depth), str(cell.batch), cell.tokenizer, fmt_count(cell.tokens)]


def failure_text(runs: list[RunLog]) -> str:
    return "/".join(sorted({r.status for r in runs}))


def ratio_text(c: CellComparison, setting: str, entries: dict[int, Entry] | None = None,
               failures: dict[int, list[RunLog]] | None = None) -> str:
    """`1.083 (1.080, 1.086)`: the mean over seeds, then each seed's ratio (or failure) in seed
    order; the setting's own results in the cell unless `entries` and `failures` are given."""
    if entries is None:
        entries, failures = c.entries.get(setting, {}), c.failures.get(setting, {})
    failures = failures or {}
    per_seed = [fmt_ratio(entries[s].ratio) if s in entries else failure_text(failures[s]) if s in failures else None
                for s in c.seeds]
    if not any(per_seed):
        return ""
    ratios = [entries[s].ratio for s in c.seeds if s in entries]
    mean = fmt_ratio(statistics.mean(ratios)) if ratios else "failed"
    if len(per_seed) == 1:
        return f"{mean} (seed {c.seeds[0]} only)"
    return f"{mean} (" + ", ".join(t or "-" for t in per_seed) + ")"


def lr_text(entry: Entry) -> str:
    return short_number(entry.run.lr) + (" (edge)" if entry.lr_at_edge else "")


def tuned_text(c: CellComparison, setting: str) -> str:
    """`s0: 2.2934 @ 1e-2 (edge); s1: ...`: a swept family's best final val loss and lr per seed."""
    entries = c.entries.get(setting, {})
    return "; ".join(f"s{s}: {fmt_loss(entries[s].final)} @ {lr_text(entries[s])}" for s in c.seeds if s in entries)


def compared_settings(cells: list[CellComparison]) -> list[str]:
    """Every setting but the reference, in the order of the tables."""
    return sorted({s for c in cells for s in c.settings if s != ADAMW}, key=setting_order)


def ratio_markdown(cells: list[CellComparison]) -> str:
    settings = compared_settings(cells)
    muon = any(MUON_LABEL in c.entries for c in cells)
    head = [*CELL_HEAD, *settings, "best AdamW (final val loss @ lr, per seed)"]
    head += ["best Muon (final val loss @ lr, per seed)"] if muon else []
    rows = [[*cell_columns(c), *(ratio_text(c, s) for s in settings), tuned_text(c, ADAMW),
             *([tuned_text(c, MUON_LABEL)] if muon else [])] for c in cells]
    return table(head, rows, left=(3, *range(len(CELL_HEAD) + len(settings), len(head))))


def detail_markdown(c: CellComparison) -> str:
    """One row per setting and seed of one cell."""
    head = ["setting", "seed", "lr", "final val loss", "× tuned AdamW", "× tuned Muon", "tokens to target",
            "seconds per token", "time to target"]
    rows = []
    for setting in c.settings:
        for seed in c.seeds:
            entry = c.entry(setting, seed)
            if entry is not None:
                rows.append([setting, str(seed), lr_text(entry) if entry.lrs else "-", fmt_loss(entry.final),
                             fmt_ratio(entry.ratio), fmt_ratio(entry.vs_muon), fmt_tokens(entry.tokens_to_target),
                             fmt_seconds_per_token(entry.seconds_per_token, entry.marked, entry.borrowed),
                             fmt_duration(entry.time_to_target, entry.marked, entry.borrowed)])
            elif failed := c.failure(setting, seed):
                last = failed[0].final_val_loss  # the last finite eval, for a run that blew up or stopped
                status = failure_text(failed) + (f" (last eval {last:.4f})" if last is not None else "")
                rows.append([setting, str(seed), "-", status, *["-"] * 5])
    return table(head, rows)


def marked_notes(cells: list[CellComparison]) -> list[str]:
    """One line per timing.json note of the runs whose timings carry the dagger, naming them by cell."""
    by_note: dict[str, dict[str, dict[str, None]]] = {}
    for c in cells:
        for e in (e for per_seed in c.entries.values() for e in per_seed.values() if e.marked):
            note = e.run.timing.get("note") or "not timed on an idle machine"
            by_note.setdefault(note, {}).setdefault(c.cell.label, {})[e.run.name] = None
    return [f"{note}: " + "; ".join(f"{cell}: {', '.join(names)}" for cell, names in per_cell.items())
            for note, per_cell in by_note.items()]


# ---- across the grid --------------------------------------------------------------------

def count_text(k: int, n: int) -> str:
    return f"{k}/{n}" if n else "-"


def summary_markdown(summaries: list[Summary]) -> str:
    head = ["setting", "cells", "mean ratio", "worst ratio", f"within {round((WITHIN - 1) * 100)}% of AdamW",
            "beats tuned Muon", "beats AGD default", "cells with a failed run"]
    rows = []
    for s in summaries:
        mean = fmt_ratio(statistics.mean(s.ratios)) if s.ratios else "-"
        worst = fmt_ratio(max(s.ratios)) if s.ratios else "-"
        muon = "-" if s.setting == MUON_LABEL else count_text(s.beats_muon, s.muon_cells)
        default = count_text(s.beats_default, s.default_cells) if s.setting != FAITHFUL_AGD else "-"
        rows.append([s.setting, str(s.cells), mean, worst, f"{s.within}/{s.cells}", muon, default,
                     str(s.failed_cells)])
    return table(head, rows)


def median_text(values: list[float], prefix: str = "") -> str:
    return f"{prefix}{statistics.median(values):.3f} (n={len(values)})" if values else "-"


def speed_markdown(summaries: list[Summary]) -> str:
    head = ["setting", "(cell, seed) pairs", "tokens to target / tuned AdamW's", "target not reached",
            "time to target / tuned AdamW's (idle machine)", f"the same, timings marked {DAGGER}"]
    rows = [[s.setting, str(len(s.ratios)), median_text(s.tokens_ratios), f"{s.not_reached}/{len(s.ratios)}",
             median_text(s.time_ratios), median_text(s.time_ratios_marked, DAGGER)] for s in summaries]
    return table(head, rows)


def gain_markdown(cells: list[CellComparison]) -> str | None:
    """Per cell and AGD setting with gain runs: the ratio to tuned AdamW at each gain."""
    curves = [(c, base, curve) for c in cells for base, curve in gain_curves(c).items()]
    if not curves:
        return None
    gains = sorted({g for _, _, curve in curves for g in curve})
    head = [*CELL_HEAD, "AGD setting", *(f"gain {short_number(g)}" for g in gains)]
    rows = [[*cell_columns(c), base, *(ratio_text(c, base, *curve[g]) if g in curve else "" for g in gains)]
            for c, base, curve in curves]
    return table(head, rows, left=(3, 5))


# ---- the long CSV -------------------------------------------------------------------------

CSV_HEAD = ["n_embd", "n_layer", "tokenizer", "global_batch_size", "block_size", "tokens", "setting", "optimiser",
            "gain_sensitivity", "seed", "status", "run", "lr", "lr_at_edge", "final_val_loss", "adamw_run", "adamw_lr",
            "adamw_final_val_loss", "ratio", "muon_run", "muon_lr", "muon_final_val_loss", "vs_muon",
            "tokens_to_target", "seconds_per_token", "time_to_target_s", "timing_marked", "timing_from"]


def csv_rows(cells: list[CellComparison]) -> list[list]:
    """One row per cell, setting and seed: its run, the tuned AdamW and Muon, the ratios and speeds."""
    rows = []
    for c in cells:
        cell = [c.cell.width, c.cell.depth, c.cell.tokenizer, c.cell.batch, c.cell.block_size, c.cell.tokens]
        for sensitivity, entries, failures in ((False, c.entries, c.failures),
                                               (True, c.sensitivity, c.sensitivity_failures)):
            for setting in sorted({*entries, *failures}, key=setting_order):
                for seed in c.seeds:
                    if (e := entries.get(setting, {}).get(seed)) is not None:
                        muon = e.muon
                        rows.append([*cell, setting, e.run.optimiser, sensitivity, seed, e.run.status, e.run.name,
                                     e.run.lr, e.lr_at_edge, e.final, e.reference.name, e.reference.lr,
                                     e.reference.final_val_loss, e.ratio, muon.name if muon else "",
                                     muon.lr if muon else "", muon.final_val_loss if muon else "", e.vs_muon,
                                     e.tokens_to_target, e.seconds_per_token, e.time_to_target, e.marked,
                                     " ".join(e.timing.borrowed_from)])
                    elif failed := failures.get(setting, {}).get(seed):
                        rows.append([*cell, setting, failed[0].optimiser, sensitivity, seed, failure_text(failed),
                                     failed[0].name, *[""] * (len(CSV_HEAD) - 12)])
    return rows


def write_comparison_csv(cells: list[CellComparison], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEAD)
        w.writerows([["" if v is None else v for v in row] for row in csv_rows(cells)])
