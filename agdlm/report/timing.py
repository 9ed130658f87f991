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
    """The idle seconds-per-token figures of every speed class, from finished runs."""

    def __init__(self, runs: list[RunLog]):
        self.idle: dict[tuple, list[tuple[float, str]]] = {}
        for r in runs:
            if r.done and r.timed_idle and (spt := r.seconds_per_token) is not None:
                self.idle.setdefault(speed_class(r), []).append((spt, r.name))

    def timing(self, run: RunLog) -> Timing:
        own = run.seconds_per_token
        if run.timed_idle and own is not None:
            return Timing(own, marked=False)
        idle = self.idle.get(speed_class(run))
        if idle:
            return Timing(statistics.median(s for s, _ in idle), marked=False,
                          borrowed_from=tuple(sorted({name for _, name in idle})))
        return Timing(own, marked=own is not None)
