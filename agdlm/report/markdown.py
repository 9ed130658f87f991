"""Markdown table text and the number formats every table shares."""

from __future__ import annotations

from agdlm.report.runs import fmt_count

DAGGER = "†"  # a timing from a run that shared its machine (timing.json idle: false)
BORROWED = "‡"  # a timing from idle runs of the same shape and optimiser (agdlm.report.timing)


def table(head: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """A markdown table; the columns in `left` are left-aligned, the others (numbers) right."""
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i in left else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse(markdown: str) -> tuple[list[str], list[list[str]]]:
    """(head, rows) of a table written by `table` (for the W&B copy of the same tables)."""
    lines = markdown.splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def fmt_loss(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else ""


def fmt_ratio(x: float | None) -> str:
    return f"{x:.3f}" if x is not None else "-"


def fmt_tokens(x: float | None) -> str:
    return fmt_count(round(x)) if x is not None else "not reached"


def timing_mark(marked: bool, borrowed: bool = False) -> str:
    return DAGGER if marked else BORROWED if borrowed else ""


def fmt_seconds_per_token(x: float | None, marked: bool, borrowed: bool = False) -> str:
    return "-" if x is None else f"{x * 1e6:.3g} µs" + timing_mark(marked, borrowed)


def fmt_duration(x: float | None, marked: bool, borrowed: bool = False) -> str:
    if x is None:
        return "-"
    text = f"{x:.3g} s" if x < 120 else f"{x / 60:.3g} min" if x < 7200 else f"{x / 3600:.3g} h"
    return text + timing_mark(marked, borrowed)
