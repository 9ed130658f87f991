"""AGD's own signals: its step size eta and gradient summary G over training (one panel per
setting, one line per cell, seeds averaged; x is the share of the run's planned tokens, so a
longer run lines up with the others), and the per-role diagnostics of one run per setting."""

from __future__ import annotations

from pathlib import Path

from agdlm.report.compare import CellComparison
from agdlm.report.optimisers import setting_order
from agdlm.report.plots.style import SHAPE_COLOURS, legend_right, pyplot, save, spread, token_axis
from agdlm.report.roles import ROLE_METRICS, logged_role_metrics, representative_agd_runs, role_series
from agdlm.report.runs import Cell, RunLog, finite

SIGNALS = {"agd_eta": "step size eta", "agd_G": "G (gradient summary)"}


def signal_curve(runs: list[RunLog], key: str):
    series = [([t["tokens"] / r.cell.tokens for t in r.trains() if finite(t.get(key))],
               [t[key] for t in r.trains() if finite(t.get(key))]) for r in runs]
    series = [s for s in series if s[0]]
    return spread(series) if series else None


def plot_agd_eta(runs: list[RunLog], cells: list[CellComparison], path: Path) -> bool:
    # gain runs left out: their eta is the gain times what AGD derives (the gain table shows them)
    agd = [r for r in runs if r.optimiser == "agd" and not r.sensitivity and r.cell.tokens > 0
           and any("agd_eta" in t for t in r.trains())]
    if not agd:
        return False
    settings = sorted({r.setting for r in agd}, key=setting_order)
    all_cells = sorted({r.cell for r in agd})
    palette = SHAPE_COLOURS if len(all_cells) <= len(SHAPE_COLOURS) else None
    plt = pyplot()
    cmap = plt.get_cmap("tab20")
    colours = {c: palette[i] if palette else cmap(i % 20) for i, c in enumerate(all_cells)}
    fig, axes = plt.subplots(len(SIGNALS), len(settings), figsize=(4.2 * len(settings), 3.1 * len(SIGNALS)),
                             squeeze=False, sharey="row")
    for col, setting in enumerate(settings):
        by_cell: dict[Cell, list[RunLog]] = {}
        for r in (r for r in agd if r.setting == setting):
            by_cell.setdefault(r.cell, []).append(r)
        for row, (key, text) in enumerate(SIGNALS.items()):
            ax = axes[row][col]
            for cell, mine in sorted(by_cell.items()):
                if curve := signal_curve(mine, key):
                    x, mean, low, high = curve
                    ax.plot(x, mean, color=colours[cell], linewidth=1.2)
                    ax.fill_between(x, low, high, color=colours[cell], alpha=0.15, linewidth=0)
            ax.set_yscale("log")  # eta and G span decades across cells and settings
            ax.set_title(f"{setting}: {text}", fontsize=8.5)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3, which="both")
        axes[-1][col].set_xlabel("share of the run's tokens", fontsize=8.5)
    for row, text in enumerate(SIGNALS.values()):
        axes[row][0].set_ylabel(text.split(" (")[0])
    handles = [plt.Line2D([], [], color=colours[c], linewidth=2) for c in all_cells]
    legend_right(fig, handles, [c.label for c in all_cells], title="cell (mean of seeds, shaded: min-max)")
    fig.tight_layout()
    save(fig, path)
    return True


def plot_agd_roles(runs: list[RunLog], cells: list[CellComparison], path: Path) -> bool:
    chosen = representative_agd_runs(runs)
    if not chosen:
        return False
    metrics = logged_role_metrics(chosen)
    plt = pyplot()
    roles = list(dict.fromkeys(role for r in chosen.values() for m in metrics for role in role_series(r, m)))
    cmap = plt.get_cmap("tab10" if len(roles) <= 10 else "tab20")
    colour = {role: cmap(i % cmap.N) for i, role in enumerate(roles)}
    fig, axes = plt.subplots(len(chosen), len(metrics), figsize=(4.4 * len(metrics), 3.1 * len(chosen)),
                             squeeze=False)
    for row, (label, run) in zip(axes, chosen.items()):
        for ax, metric in zip(row, metrics):
            for role, (tokens, values) in role_series(run, metric).items():
                ax.plot(tokens, values, color=colour[role], linewidth=1.3, marker="." if len(values) < 30 else None)
            if metric == "agd_rel_update" and ax.lines:
                ax.set_yscale("log")  # update sizes span decades across roles
            ax.set_title(f"AGD {label}: {ROLE_METRICS[metric]}\n{run.name}", fontsize=8.5)
            token_axis(ax)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[-1]:
        ax.set_xlabel("tokens seen", fontsize=8.5)
    handles = [plt.Line2D([], [], color=colour[r], linewidth=2) for r in roles]
    legend_right(fig, handles, roles, title="role")
    fig.tight_layout()
    save(fig, path)
    return True
