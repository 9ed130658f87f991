"""Learning-rate curves: the transfer plot (per swept family, final val loss against lr, one
line per cell, never mixing cells) and AGD's gain sensitivity beside AdamW's and Muon's lr
curves in the same cells, on one axis of multiples of the default (gain / 1, lr / best lr)."""

from __future__ import annotations

import statistics
from pathlib import Path

from agdlm.report.compare import CellComparison, gain_curves
from agdlm.report.optimisers import FAMILY_LABEL, LR_SWEPT, MUON, REFERENCE, setting_order
from agdlm.report.plots.style import (hide_unused, label_rows, legend_right, log_axis, pyplot, report_settings,
                                      save, setting_colours, setting_style, shape_colours, shape_label)
from agdlm.report.runs import Cell, RunLog, group_label


def lr_curve(runs: list[RunLog]) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """(lrs, mean, min, max over seeds, lrs where every run failed) of one family in one cell."""
    finals: dict[float, list[float]] = {}
    failed: set[float] = set()
    for r in runs:
        if r.usable:
            finals.setdefault(r.lr, []).append(r.final_val_loss)
        else:
            failed.add(r.lr)
    xs = sorted(finals)
    return (xs, [statistics.mean(finals[x]) for x in xs], [min(finals[x]) for x in xs],
            [max(finals[x]) for x in xs], sorted(failed - set(finals)))


def draw_curve(ax, x, mean, low, high, colour, style="-", label=None, best=True) -> None:
    ax.plot(x, mean, color=colour, linestyle=style, marker="o", markersize=3.5, linewidth=1.5, label=label)
    ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)
    if best and x:
        k = min(range(len(x)), key=mean.__getitem__)
        ax.plot([x[k]], [mean[k]], color=colour, marker="*", markersize=12, linestyle="none")


def draw_failed(ax, lrs: list[float], colour) -> None:
    """A lr whose every run failed: an x at the top edge (it has no final loss to place)."""
    if lrs:
        ax.plot(lrs, [0.97] * len(lrs), color=colour, marker="x", markersize=8, linestyle="none",
                transform=ax.get_xaxis_transform(), clip_on=False)


def plot_lr_transfer(runs: list[RunLog], cells: list[CellComparison], path: Path) -> bool:
    families = [f for f in LR_SWEPT if any(r.optimiser == f for r in runs)]
    if not families:
        return False
    swept = [r for r in runs if r.optimiser in families]
    groups = sorted({r.cell.group for r in swept})
    colours = shape_colours(list({r.cell.shape for r in swept}))
    plt = pyplot()
    fig, axes = plt.subplots(len(families), len(groups), figsize=(4.4 * len(groups), 3.3 * len(families)),
                             squeeze=False, sharex="row")  # one lr range per family: best lrs line up
    any_failed = False
    for row, family in zip(axes, families):
        for ax, group in zip(row, groups):
            mine = [r for r in swept if r.optimiser == family and r.cell.group == group]
            by_cell: dict[Cell, list[RunLog]] = {}
            for r in mine:
                by_cell.setdefault(r.cell, []).append(r)
            for cell in sorted(by_cell, key=lambda c: c.shape):
                x, mean, low, high, failed = lr_curve(by_cell[cell])
                draw_curve(ax, x, mean, low, high, colours[cell.shape])
                draw_failed(ax, failed, colours[cell.shape])
                any_failed |= bool(failed)
            if not mine:
                ax.text(0.5, 0.5, f"no {FAMILY_LABEL[family]} runs", ha="center", va="center",
                        transform=ax.transAxes, color="0.5")
            log_axis(ax)
            ax.set_title(f"{FAMILY_LABEL[family]} · {group_label(group)}", fontsize=8.5)
            ax.set_xlabel(f"{FAMILY_LABEL[family]} peak learning rate", fontsize=8.5)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3, which="both")
        row[0].set_ylabel("final validation loss")
    handles = [plt.Line2D([], [], color=c, marker="o", linewidth=1.5) for c in colours.values()]
    labels = [shape_label(s) for s in colours]
    handles.append(plt.Line2D([], [], color="k", marker="*", markersize=11, linestyle="none"))
    labels.append("best lr (seed mean)")
    if any_failed:
        handles.append(plt.Line2D([], [], color="k", marker="x", markersize=8, linestyle="none"))
        labels.append("every run at this lr failed")
    legend_right(fig, handles, labels, title="model (one line per cell)\nmean of seeds, shaded: min-max")
    fig.tight_layout()
    save(fig, path)
    return True


def multiples(runs: list[RunLog]) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """A swept family in one cell against lr / its best lr (seed mean)."""
    x, mean, low, high, _ = lr_curve(runs)
    if not x:
        return None
    best = x[min(range(len(x)), key=mean.__getitem__)]
    return [v / best for v in x], mean, low, high


def plot_gain_sensitivity(runs: list[RunLog], cells: list[CellComparison], path: Path) -> bool:
    panels = [(c, curves) for c in cells if (curves := gain_curves(c))]
    if not panels:
        return False
    swept = [FAMILY_LABEL[REFERENCE], FAMILY_LABEL[MUON]]
    agd = sorted({base for _, curves in panels for base in curves}, key=setting_order)
    colours = setting_colours(report_settings(runs) + agd)
    plt = pyplot()
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (c, curves) in zip(axes.flat, panels):
        for family in (REFERENCE, MUON):
            curve = multiples([r for r in runs if r.cell == c.cell and r.optimiser == family and r.seed in c.seeds])
            if curve:
                draw_curve(ax, *curve, colour=colours[FAMILY_LABEL[family]], best=False)
        for base, by_gain in curves.items():
            points = [(g, [e.final for e in entries.values()]) for g, (entries, _) in by_gain.items() if entries]
            draw_curve(ax, [g for g, _ in points], [statistics.mean(v) for _, v in points],
                       [min(v) for _, v in points], [max(v) for _, v in points], colours[base],
                       setting_style(base), best=False)
            failed = [g for g, (entries, failures) in by_gain.items() if failures and not entries]
            draw_failed(ax, failed, colours[base])
        ax.axvline(1.0, color="0.4", linewidth=0.8, linestyle=":")
        log_axis(ax, base=2)
        ax.set_title(c.cell.label, fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="both")
    hide_unused(axes, len(panels))
    fig.supxlabel("multiple of the default: AGD gain / 1; AdamW, Muon lr / their best lr in the cell")
    label_rows(axes, "final validation loss")
    handles = [plt.Line2D([], [], color=colours[s], linestyle=setting_style(s), marker="o", linewidth=1.5)
               for s in swept + agd]
    labels = [f"{s} (lr)" for s in swept] + [f"{s} (gain)" for s in agd]
    legend_right(fig, handles, labels, title="mean of seeds, shaded: min-max")
    fig.tight_layout()
    save(fig, path)
    return True
