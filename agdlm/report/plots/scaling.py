"""Final val loss against training compute across widths, one panel per scaling group, each
setting's points (seed mean, min-max bars) and its fitted power law where it has one."""

from __future__ import annotations

from pathlib import Path

from agdlm.report.compare import CellComparison
from agdlm.report.optimisers import setting_order
from agdlm.report.plots.style import (hide_unused, label_rows, legend_right, log_axis, pyplot, report_settings,
                                      save, setting_colours, setting_style)
from agdlm.report.runs import RunLog
from agdlm.report.scaling import scaling_groups


def plot_compute_scaling(runs: list[RunLog], cells: list[CellComparison], path: Path) -> bool:
    import numpy as np
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    groups = scaling_groups(cells)
    if not groups:
        return False
    settings = sorted({s for g in groups for s in g.settings}, key=setting_order)
    colours = setting_colours(report_settings(runs))
    plt = pyplot()
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for setting, p in group.settings.items():
            colour = colours[setting]
            ax.errorbar(p.compute, p.loss, yerr=[np.subtract(p.loss, p.low), np.subtract(p.high, p.loss)],
                        color=colour, marker="o", markersize=4, linestyle="none", capsize=2)
            if p.fit is not None:
                c = np.geomspace(min(p.compute), max(p.compute), 50)
                ax.plot(c, p.fit.loss(c), color=colour, linestyle=setting_style(setting), linewidth=1.3)
        computes = {}
        for p in group.settings.values():
            computes.update(zip(p.widths, p.compute))
        log_axis(ax)
        ax.margins(x=0.08)
        top = ax.secondary_xaxis("top")  # which width each compute is, off the data
        top.set_xscale("log")
        top.xaxis.set_major_locator(FixedLocator(list(computes.values())))
        top.xaxis.set_major_formatter(FixedFormatter([f"w{w}" for w in computes]))
        top.xaxis.set_minor_locator(NullLocator())
        top.tick_params(labelsize=7.5, colors="0.35")
        ax.set_title(group.label, fontsize=8.5, pad=14)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="both")
    hide_unused(axes, len(groups))
    fig.supxlabel("training compute (FLOPs: 6N + 12LdT per token, times tokens)")
    label_rows(axes, "final validation loss (tuned)")
    handles = [plt.Line2D([], [], color=colours[s], linestyle=setting_style(s), marker="o", linewidth=1.3)
               for s in settings]
    legend_right(fig, handles, settings, title="points: mean of seeds (bars: min-max)\n"
                                                "lines: L(C) = a C^-b + c, where 3+ widths")
    fig.tight_layout()
    save(fig, path)
    return True
