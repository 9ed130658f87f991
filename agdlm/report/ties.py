"""The study's third-seed rule: where the top two settings of a cell are within the two seeds'
spread, a third seed is run for those two before the decision.

Per cell: every setting (a swept family at its best lr per seed, as the ratio table has it; each
learning-rate-free setting as run; gain runs never) with a final loss on each of the cell's
first two seeds is ranked by the mean of the two. The top two are a near tie when the gap between
their means is at most the larger of their own seed spreads (|seed 0 - seed 1|). A third seed
runs each at one setting: a swept family at its lr with the lowest two-seed mean. Once it has
run, the decision is read from the three-seed means."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from agdlm.report.compare import CellComparison
from agdlm.report.markdown import fmt_loss, table
from agdlm.report.runs import Cell, RunLog
from agdlm.sweep import short_number


@dataclass
class Contender:
    setting: str
    finals: tuple[float, float]  # the first two seeds, each at its best lr
    lr: float | None  # a swept family: its lr with the lowest two-seed mean; what a third seed runs
    third: float | None = None  # the third seed's final val loss, once it ran

    @property
    def mean(self) -> float:
        return statistics.mean(self.finals)

    @property
    def spread(self) -> float:
        return abs(self.finals[0] - self.finals[1])

    @property
    def mean_of_three(self) -> float | None:
        return None if self.third is None else statistics.mean([*self.finals, self.third])

    @property
    def label(self) -> str:
        return self.setting + (f" @ {short_number(self.lr)}" if self.lr is not None else "")


@dataclass
class Tie:
    cell: CellComparison
    first: Contender
    second: Contender

    @property
    def gap(self) -> float:
        return self.second.mean - self.first.mean

    @property
    def spread(self) -> float:
        return max(self.first.spread, self.second.spread)

    @property
    def near(self) -> bool:
        return self.gap <= self.spread

    @property
    def decided(self) -> str:
        a, b = self.first.mean_of_three, self.second.mean_of_three
        if not self.near:
            return "no third seed needed"
        if a is None or b is None:
            return "third seed not run yet"
        best, other = (self.first, self.second) if a <= b else (self.second, self.first)
        return (f"{best.setting} by {abs(a - b):.4f} over three seeds "
                f"({fmt_loss(best.mean_of_three)} vs {fmt_loss(other.mean_of_three)})")


def seed_mean_lr(runs: list[RunLog], seeds: tuple[int, int]) -> float | None:
    """The lr whose finished runs on both seeds have the lowest mean final val loss."""
    by_lr: dict[float, dict[int, float]] = {}
    for r in runs:
        if r.usable and r.lr is not None and r.seed in seeds:
            by_lr.setdefault(r.lr, {})[r.seed] = r.final_val_loss
    both = {lr: statistics.mean(f.values()) for lr, f in by_lr.items() if len(f) == len(seeds)}
    return min(both, key=both.get) if both else None


def contenders(c: CellComparison, runs: list[RunLog]) -> list[Contender]:
    """Every setting with a result on both of the cell's first two seeds (a swept family: at the
    same lrs on both), best mean first; `runs`: the cell's."""
    if len(c.seeds) < 2:
        return []
    seeds = (c.seeds[0], c.seeds[1])
    found = []
    for setting, per_seed in c.entries.items():
        if not all(s in per_seed for s in seeds) or per_seed[seeds[0]].lrs != per_seed[seeds[1]].lrs:
            continue  # a seed still to run, or a swept family with lrs still to run on one seed
        mine = [r for r in runs if r.setting == setting and not r.sensitivity]
        swept = per_seed[seeds[0]].run.lr is not None
        lr = seed_mean_lr(mine, seeds) if swept else None
        third = [r.final_val_loss for r in mine if r.usable and r.seed not in seeds and r.lr == lr]
        found.append(Contender(setting, (per_seed[seeds[0]].final, per_seed[seeds[1]].final), lr,
                               third[0] if third else None))
    return sorted(found, key=lambda k: k.mean)


def top_two(cells: list[CellComparison], runs: list[RunLog]) -> list[Tie]:
    """Per cell with two seeds, its top two settings."""
    by_cell: dict[Cell, list[RunLog]] = {}
    for r in runs:
        by_cell.setdefault(r.cell, []).append(r)
    ties = []
    for c in cells:
        ranked = contenders(c, by_cell[c.cell])
        if len(ranked) >= 2:
            ties.append(Tie(c, ranked[0], ranked[1]))
    return ties


TIES_NOTE = (
    "The third-seed rule: per cell, every setting with both seeds (a swept family at its best lr per seed) ranked by "
    "the two seeds' mean final val loss. The top two are a near tie when the gap between their means is at most the "
    "larger of their seed spreads (|seed 0 - seed 1|); then each runs a third seed (a swept family at its lr with the "
    "lowest two-seed mean, named here) and the decision is the three-seed mean.")


def ties_markdown(ties: list[Tie]) -> str | None:
    if not ties:
        return None
    head = ["cell", "first (mean; seeds)", "second (mean; seeds)", "gap", "larger spread", "near tie", "decision"]
    rows = [[t.cell.cell.label,
             f"{t.first.label} ({fmt_loss(t.first.mean)}; {', '.join(map(fmt_loss, t.first.finals))})",
             f"{t.second.label} ({fmt_loss(t.second.mean)}; {', '.join(map(fmt_loss, t.second.finals))})",
             f"{t.gap:.4f}", f"{t.spread:.4f}", "yes" if t.near else "no", t.decided] for t in ties]
    return table(head, rows, left=(0, 1, 2, 5, 6))
