"""Validation loss against tokens: one panel per cell (small multiples), one colour per
optimiser setting, seeds as their mean with the min-max spread shaded. A swept family is drawn
at one lr per cell: the one with the lowest seed-mean final val loss (named in the panel title)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from agdlm.report.compare import CellComparison
from agdlm.report.optimisers import LR_SWEPT, setting_order
from agdlm.report.plots.style import (hide_unused, label_rows, legend_right, pyplot, report_settings, save,
                                      setting_colours, setting_style, spread, token_axis)
from agdlm.report.runs import Cell, RunLog
from agdlm.sweep import short_number

COLUMNS = 4


def best_lr_runs(runs: list[RunLog]) -> tuple[float | None, list[RunLog]]:
    """A swept family's runs (every seed) at the lr with the lowest mean final val loss; an
    lr-free setting's runs as they are."""
    if runs[0].optimiser not in LR_SWEPT:
        return None, runs
    by_lr: dict[float, list[RunLog]] = {}
    for r in runs:
        by_lr.setdefault(r.lr, []).append(r)
    lr = min(by_lr, key=lambda x: statistics.mean(r.final_val_loss for r in by_lr[x]))
    return lr, by_lr[lr]


def cell_curves(runs: list[RunLog]) -> dict[str, tuple[float | None, tuple]]:
    """setting -> (its lr or None, (tokens, mean, min, max) over seeds)."""
    by_setting: dict[str, list[RunLog]] = {}
    for r in runs:
        by_setting.setdefault(r.setting, []).append(r)
    out = {}
    for setting in sorted(by_setting, key=setting_order):
        lr, chosen = best_lr_runs(by_setting[setting])
        curve = spread([([e["tokens"] for e in r.evals()], [e["val_loss"] for e in r.evals()]) for r in chosen])
        if curve[0]:
            out[setting] = (lr, curve)
    return out


def y_limits(curves: dict[str, tuple]) -> tuple[float, float]:
    """From below the lowest loss to the highest curve at a fifth of the run: the early drop
    from the initial loss is cut off, so the curves' ends (what the study compares) get the room."""
    low = min(min(c[2]) for _, c in curves.values())
    end = max(c[0][-1] for _, c in curves.values())
    early = [next((m for x, m in zip(c[0], c[1]) if x >= 0.2 * end), c[1][-1]) for _, c in curves.values()]
    high = max(max(early), max(c[1][-1] for _, c in curves.values()) + 0.02)
    pad = 0.04 * (high - low)
    return low - pad, high + pad


def plot_val_loss(runs: list[RunLog], cells: list[CellComparison], path: Path) -> bool:
    plotted = [r for r in runs if r.usable and not r.sensitivity and r.evals()]
    if not plotted:
        return False
    by_cell: dict[Cell, list[RunLog]] = {}
    for r in plotted:
        by_cell.setdefault(r.cell, []).append(r)
    colours = setting_colours(report_settings(runs))
    colours = {s: c for s, c in colours.items() if any(r.setting == s for r in plotted)}
    plt = pyplot()
    ncols = min(COLUMNS, len(by_cell))
    nrows = math.ceil(len(by_cell) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.4 * nrows), squeeze=False)
    for ax, cell in zip(axes.flat, sorted(by_cell)):
        curves = cell_curves(by_cell[cell])
        for setting, (_, (x, mean, low, high)) in curves.items():
            ax.plot(x, mean, color=colours[setting], linestyle=setting_style(setting), linewidth=1.5, label=setting)
            ax.fill_between(x, low, high, color=colours[setting], alpha=0.2, linewidth=0)
        lrs = " · ".join(f"{s} {short_number(lr)}" for s, (lr, _) in curves.items() if lr is not None)
        ax.set_title(cell.label + (f"\nlr: {lrs}" if lrs else ""), fontsize=8.5)
        ax.set_ylim(*y_limits(curves))
        token_axis(ax)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    hide_unused(axes, len(by_cell))
    fig.supxlabel("tokens seen")
    label_rows(axes, "validation loss")
    handles = [plt.Line2D([], [], color=c, linestyle=setting_style(s), linewidth=2) for s, c in colours.items()]
    legend_right(fig, handles, list(colours), title="mean of seeds, shaded: min-max")
    fig.tight_layout()
    save(fig, path)
    return True
