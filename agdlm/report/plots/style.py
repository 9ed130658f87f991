"""What every plot shares: the Agg backend, one colour per optimiser setting and per model shape
(the same in every figure), mean-and-spread curves over seeds, legends outside the axes."""

from __future__ import annotations

import statistics
from pathlib import Path

from agdlm.report.optimisers import FAMILY_LABEL, LR_SWEPT, setting_order
from agdlm.report.runs import fmt_count
from agdlm.sweep import short_number

DPI = 90
FAMILY_COLOUR = {"AdamW": "#1f77b4", "Muon": "#d62728", "Schedule-free": "#9467bd", "Prodigy": "#8c564b"}
AGD_COLOURS = ["#2ca02c", "#ff7f0e", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#393b79", "#637939"]
SHAPE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"]
SWEPT_LABELS = {FAMILY_LABEL[f] for f in LR_SWEPT}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report_settings(runs) -> list[str]:
    """Every setting of the report (gain runs aside), in table order: the same colours in every figure."""
    return sorted({r.setting for r in runs if not r.sensitivity}, key=setting_order)


def setting_colours(settings: list[str]) -> dict[str, str]:
    """Swept families in their fixed colours, AGD settings and anything else from one list, in order."""
    out, spare = {}, iter(AGD_COLOURS * 4)
    for s in dict.fromkeys(settings):  # a repeated setting keeps its first colour
        family = s.split(" ")[0]
        out[s] = FAMILY_COLOUR.get(s) or FAMILY_COLOUR.get(family) or next(spare)
    return out


def setting_style(setting: str) -> str:
    """Tuned (lr-swept) settings solid, learning-rate-free ones dashed."""
    return "-" if setting in SWEPT_LABELS else "--"


def shape_colours(shapes: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    return {shape: SHAPE_COLOURS[i % len(SHAPE_COLOURS)] for i, shape in enumerate(sorted(shapes))}


def shape_label(shape: tuple[int, int]) -> str:
    depth, width = shape
    return f"w{width} L{depth}"


def spread(xs_ys: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean, min, max) over the curves at the x values all of them share (seeds log alike)."""
    common = set(xs_ys[0][0]).intersection(*(set(xs) for xs, _ in xs_ys[1:]))
    maps = [dict(zip(xs, ys)) for xs, ys in xs_ys]
    x = sorted(common)
    values = [[m[v] for m in maps] for v in x]
    return x, [statistics.mean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def token_axis(ax) -> None:
    """Tokens as 256k, 1.05M instead of an offset exponent."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_count(int(v)) if v > 0 else "0"))


def log_axis(ax, base: float = 10) -> None:
    """A log x axis labelled 1e-3, 2e-3, 5e-3 (or 0.5, 1, 2 in base 2), no crowded minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=base)
    ax.xaxis.set_major_locator(LogLocator(base=base, subs=(1.0, 2.0, 5.0) if base == 10 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short_number(float(f"{v:.3g}"))))
    ax.xaxis.set_minor_formatter(NullFormatter())


def legend_right(fig, handles, labels, title: str | None = None) -> None:
    """One legend for the whole figure, outside the axes on the right (savefig grows to fit)."""
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, title=title,
               title_fontsize=9, frameon=False)


def save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # tight: the legends outside the axes are kept
    pyplot().close(fig)


def label_rows(axes, text: str) -> None:
    """The y label on each row's first panel (a figure-wide one collides with the tick labels)."""
    for row in axes:
        row[0].set_ylabel(text, fontsize=9)


def hide_unused(axes, used: int) -> None:
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
