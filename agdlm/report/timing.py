"""Seconds per token, from an idle machine wherever one measured it.

A run's speed is a property of its shape and its optimiser's arithmetic: the model and batch
(width, layers, tokenizer, batch, block) and the setting (AdamW, Muon, an AGD variant), not
its learning rate, seed, gain or length. So a run that shared its machine (timing.json idle:
false) takes the median of the idle runs of the same speed class: its own cell's other lrs and
seeds, or short timing-only runs made for this (`agdlm report --timing-runs`). Only where no
idle run of the class exists does it keep its own figure, marked."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from agdlm.report.markdown import table
from agdlm.report.runs import RunLog


@dataclass(frozen=True)
class Timing:
    seconds_per_token: float | None
    marked: bool  # measured on a shared machine: never mixed with idle figures
    borrowed_from: tuple[str, ...] = ()  # the idle runs of the same speed class it came from, if not its own


def speed_class(run: RunLog) -> tuple:
    """What a run's speed depends on: the shape, the batch and the optimiser's arithmetic."""
    cell = run.cell
    return (cell.width, cell.depth, cell.tokenizer, cell.batch, cell.block_size, run.base_setting)


class SpeedBook:
    """The idle seconds-per-token figures of every speed class from finished runs, the full-length
    runs' and the timing-only runs' apart (for the check of one against the other)."""

    def __init__(self, runs: list[RunLog], timing_runs: list[RunLog] = ()):
        self.full = idle_figures(runs)
        self.short = idle_figures(timing_runs)

    def timing(self, run: RunLog) -> Timing:
        own = run.seconds_per_token
        if run.timed_idle and own is not None:
            return Timing(own, marked=False)
        idle = self.full.get(speed_class(run), []) + self.short.get(speed_class(run), [])
        if idle:
            return Timing(statistics.median(s for s, _ in idle), marked=False,
                          borrowed_from=tuple(sorted({name for _, name in idle})))
        return Timing(own, marked=own is not None)

    def checks(self) -> list[tuple[tuple, float, float, int]]:
        """Per speed class with both: (class, the timing-only runs' median, the full-length idle
        runs' median, how many full-length runs): is a short run's speed a long run's?"""
        return [(key, statistics.median(s for s, _ in short), statistics.median(s for s, _ in self.full[key]),
                 len(self.full[key])) for key, short in sorted(self.short.items()) if key in self.full]


def idle_figures(runs: list[RunLog]) -> dict[tuple, list[tuple[float, str]]]:
    """Speed class -> (seconds per token, run name) of the finished runs timed on an idle machine."""
    figures: dict[tuple, list[tuple[float, str]]] = {}
    for r in runs:
        if r.done and r.timed_idle and (spt := r.seconds_per_token) is not None:
            figures.setdefault(speed_class(r), []).append((spt, r.name))
    return figures


CHECK_NOTE = (
    "The check on taking speed from short timing-only runs: where a shape and optimiser has both, the short runs' "
    "median seconds per token against the full-length idle runs'.")


def checks_markdown(book: SpeedBook) -> str | None:
    rows = [[f"w{w} L{d} · b{b} · {tok}", setting, f"{short * 1e6:.3g} µs", f"{full * 1e6:.3g} µs ({n})",
             f"{short / full:.3f}"] for (w, d, tok, b, _, setting), short, full, n in book.checks()]
    if not rows:
        return None
    return table(["shape", "setting", "short runs", "full-length idle runs (n)", "short / full"], rows, left=(0, 1))
