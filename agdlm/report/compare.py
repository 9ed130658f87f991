"""Every optimiser setting against the best-tuned AdamW of the same cell and seed.

Per cell and seed: the lr-swept families (AdamW, Muon, schedule-free) at their best lr (lowest
final val loss over the finished runs), each learning-rate-free setting (an AGD label, Prodigy)
as run. The tuned AdamW's final val loss is the target: how many tokens, and how many seconds,
each setting needs to reach it. AGD at a gain other than 1 is kept apart (the sensitivity
curve): it never enters the table a setting is chosen from."""

from __future__ import annotations

from dataclasses import dataclass, field

from agdlm.report.optimisers import FAITHFUL_AGD, LR_SWEPT, MUON, REFERENCE, family_label, setting_order
from agdlm.report.runs import Cell, RunLog
from agdlm.report.timing import SpeedBook, Timing

WITHIN = 1.05  # "close to tuned AdamW": the study's decision rule


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first tokens at which the (tokens, val loss) curve is at or below `target`, linear
    between evals; None when it never gets there."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            t0, l0 = previous  # l0 > target >= loss
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        previous = (tokens, loss)
    return None


def eval_curve(run: RunLog) -> list[tuple[float, float]]:
    return [(e["tokens"], e["val_loss"]) for e in run.evals()]


@dataclass
class Entry:
    """One setting in one cell and seed: its run (a swept family's best lr), the tuned AdamW
    and tuned Muon of the same cell and seed."""
    cell: Cell
    seed: int
    setting: str
    run: RunLog
    reference: RunLog
    timing: Timing  # seconds per token, from an idle machine where one measured it
    muon: RunLog | None = None
    lrs: tuple[float, ...] = ()  # a swept family: the lrs that finished in this cell and seed

    @property
    def final(self) -> float:
        return self.run.final_val_loss

    @property
    def ratio(self) -> float:
        return self.final / self.reference.final_val_loss

    @property
    def vs_muon(self) -> float | None:
        return None if self.muon is None or self.muon is self.run else self.final / self.muon.final_val_loss

    @property
    def lr_at_edge(self) -> bool:
        """Best at the smallest or largest of 3+ lrs: a better one may lie outside the range."""
        return len(self.lrs) >= 3 and self.run.lr in (min(self.lrs), max(self.lrs))

    @property
    def target(self) -> float:
        return self.reference.final_val_loss

    @property
    def tokens_to_target(self) -> float | None:
        return tokens_to_reach(eval_curve(self.run), self.target)

    @property
    def seconds_per_token(self) -> float | None:
        return self.timing.seconds_per_token

    @property
    def time_to_target(self) -> float | None:
        tokens, spt = self.tokens_to_target, self.seconds_per_token
        return tokens * spt if tokens is not None and spt is not None else None

    @property
    def marked(self) -> bool:
        """Timed on a shared machine (timing.json idle: false), with no idle run of its speed class."""
        return self.timing.marked

    @property
    def borrowed(self) -> bool:
        """Its seconds per token come from idle runs of the same shape and optimiser, not its own."""
        return bool(self.timing.borrowed_from)


@dataclass
class CellComparison:
    """One cell: per setting and seed an Entry (or the runs that failed); sensitivity holds the
    AGD gain runs, keyed by their own label."""
    cell: Cell
    entries: dict[str, dict[int, Entry]] = field(default_factory=dict)
    failures: dict[str, dict[int, list[RunLog]]] = field(default_factory=dict)
    sensitivity: dict[str, dict[int, Entry]] = field(default_factory=dict)
    sensitivity_failures: dict[str, dict[int, list[RunLog]]] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.entries[family_label(REFERENCE)])

    @property
    def settings(self) -> list[str]:
        """Every setting with a result or a failure here, the reference first."""
        others = {s for s in [*self.entries, *self.failures] if s != family_label(REFERENCE)}
        return [family_label(REFERENCE), *sorted(others, key=setting_order)]

    def entry(self, setting: str, seed: int) -> Entry | None:
        return self.entries.get(setting, {}).get(seed)

    def failure(self, setting: str, seed: int) -> list[RunLog]:
        return self.failures.get(setting, {}).get(seed, [])


def best_by_final(runs: list[RunLog]) -> RunLog:
    return min(runs, key=lambda r: r.final_val_loss)  # ties: the first in sort order (lower lr)


def tuned_seeds(runs: list[RunLog]) -> set[int]:
    """The seeds with a tuned AdamW: as many of its lrs run as on any seed of the cell (a
    third-seed AdamW at one lr is no tuned reference), and one of them finished."""
    adamw = [r for r in runs if r.optimiser == REFERENCE]
    lrs: dict[int, set[float]] = {}
    for r in adamw:
        lrs.setdefault(r.seed, set()).add(r.lr)
    most = max(map(len, lrs.values()), default=0)
    finished = {r.seed for r in adamw if r.usable}
    return {seed for seed, mine in lrs.items() if len(mine) == most and seed in finished}


def compare_cell(cell: Cell, runs: list[RunLog], speeds: SpeedBook) -> CellComparison | None:
    """The comparison of one cell's runs; None without a tuned AdamW or without anything else."""
    usable = [r for r in runs if r.usable]
    by_seed: dict[int, list[RunLog]] = {}
    for r in usable:
        by_seed.setdefault(r.seed, []).append(r)
    tuned = tuned_seeds(runs)
    reference = {seed: best_by_final([r for r in rs if r.optimiser == REFERENCE])
                 for seed, rs in by_seed.items() if seed in tuned}
    muon = {seed: best_by_final([r for r in rs if r.optimiser == MUON])
            for seed, rs in by_seed.items() if any(r.optimiser == MUON for r in rs)}
    comparison = CellComparison(cell)
    grouped: dict[tuple[str, int], list[RunLog]] = {}
    for r in runs:
        if r.seed in reference:
            grouped.setdefault((r.setting, r.seed), []).append(r)
    for (setting, seed), mine in grouped.items():
        ok = [r for r in mine if r.usable]
        apart = any(r.sensitivity for r in mine)
        entries = comparison.sensitivity if apart else comparison.entries
        if not ok and all(r.status == "not finished" for r in mine):
            continue  # still running (or stopped before DONE): listed as not finished, not a failure
        if not ok:  # every run of this setting failed here: a result, shown as such
            (comparison.sensitivity_failures if apart else comparison.failures).setdefault(setting, {})[seed] = mine
            continue
        swept = ok[0].optimiser in LR_SWEPT
        run = best_by_final(ok) if swept else ok[0]  # lr-free duplicates: the first by name (duplicate_runs warns)
        lrs = tuple(sorted({r.lr for r in ok})) if swept else ()
        entries.setdefault(setting, {})[seed] = Entry(cell, seed, setting, run, reference[seed], speeds.timing(run),
                                                      muon.get(seed), lrs)
    return comparison if len(comparison.settings) > 1 or comparison.sensitivity else None


def compare_cells(runs: list[RunLog], speeds: SpeedBook | None = None) -> list[CellComparison]:
    """Every cell that holds a tuned AdamW and some other setting, in cell order; seconds per
    token from `speeds` (agdlm.report.timing), by default from these runs alone."""
    speeds = speeds or SpeedBook(runs)
    by_cell: dict[Cell, list[RunLog]] = {}
    for r in runs:
        by_cell.setdefault(r.cell, []).append(r)
    return [c for cell in sorted(by_cell) if (c := compare_cell(cell, by_cell[cell], speeds)) is not None]


def duplicate_runs(runs: list[RunLog]) -> list[str]:
    """One warning per learning-rate-free setting run twice in one cell and seed: the report
    uses the first by name, and says so (it never picks the better of the two)."""
    seen: dict[tuple, list[RunLog]] = {}
    for r in runs:
        if r.optimiser not in LR_SWEPT and r.usable:
            seen.setdefault((r.cell, r.setting, r.seed), []).append(r)
    return [f"{setting} ran {len(rs)} times in {cell.label}, seed {seed}: using {rs[0].path}, not "
            + ", ".join(str(r.path) for r in rs[1:])
            for (cell, setting, seed), rs in seen.items() if len(rs) > 1]


# ---- across the grid --------------------------------------------------------------------

@dataclass
class Summary:
    """One setting over every cell it ran in (seeds with a tuned AdamW)."""
    setting: str
    cells: int = 0
    ratios: list[float] = field(default_factory=list)  # every (cell, seed) ratio
    within: int = 0  # cells where every seed's ratio is <= WITHIN (a failed seed is not)
    failed_cells: int = 0
    muon_cells: int = 0  # cells with a tuned Muon of a common seed
    beats_muon: int = 0  # ... where every such seed's final val loss is below tuned Muon's
    default_cells: int = 0
    beats_default: int = 0
    tokens_ratios: list[float] = field(default_factory=list)  # tokens to target / tuned AdamW's
    not_reached: int = 0  # (cell, seed) pairs that never reach the target
    time_ratios: list[float] = field(default_factory=list)  # time to target / tuned AdamW's, idle timings
    time_ratios_marked: list[float] = field(default_factory=list)  # the same where either timing is marked


def beats_all(mine: dict[int, Entry | None], theirs: dict[int, Entry]) -> tuple[bool, bool]:
    """(compared, beats): over the seeds both ran, every one of mine below theirs; a failed
    seed of mine never beats."""
    common = [s for s in mine if s in theirs]
    if not common:
        return False, False
    return True, all(mine[s] is not None and mine[s].final < theirs[s].final for s in common)


def summarise(cells: list[CellComparison], default: str = FAITHFUL_AGD) -> list[Summary]:
    """Per setting but the reference: the grid summary the decision rules are read from."""
    settings = sorted({s for c in cells for s in c.settings if s != family_label(REFERENCE)}, key=setting_order)
    out = []
    for setting in settings:
        row = Summary(setting)
        for c in cells:
            mine: dict[int, Entry | None] = {s: c.entry(setting, s) for s in c.seeds
                                             if c.entry(setting, s) or c.failure(setting, s)}
            if not mine:
                continue
            row.cells += 1
            ratios = [e.ratio for e in mine.values() if e is not None]
            row.ratios += ratios
            failed = len(ratios) < len(mine)
            row.failed_cells += failed
            row.within += not failed and all(x <= WITHIN for x in ratios)
            if setting != family_label(MUON):
                compared, beats = beats_all(mine, c.entries.get(family_label(MUON), {}))
                row.muon_cells += compared
                row.beats_muon += beats
            if setting.startswith("AGD") and setting != default:
                compared, beats = beats_all(mine, c.entries.get(default, {}))
                row.default_cells += compared
                row.beats_default += beats
            for entry in (e for e in mine.values() if e is not None):
                add_speed(row, entry, c.entry(family_label(REFERENCE), entry.seed))
        out.append(row)
    return out


def add_speed(row: Summary, entry: Entry, reference: Entry) -> None:
    """Add one (cell, seed) to the tokens and time figures; never mix marked timings with idle ones."""
    mine, theirs = entry.tokens_to_target, reference.tokens_to_target
    if mine is None:
        row.not_reached += 1
        return
    if theirs:
        row.tokens_ratios.append(mine / theirs)
    mine_t, theirs_t = entry.time_to_target, reference.time_to_target
    if mine_t is not None and theirs_t:
        (row.time_ratios_marked if entry.marked or reference.marked else row.time_ratios).append(mine_t / theirs_t)


def gain_curves(c: CellComparison) -> dict[str, dict[float, tuple[dict[int, Entry], dict[int, list[RunLog]]]]]:
    """Per AGD setting with gain runs in this cell: gain -> (seed -> entry, seed -> failed runs),
    gain 1 (the setting itself) included."""
    curves: dict[str, dict[float, tuple[dict, dict]]] = {}
    for label in {*c.sensitivity, *c.sensitivity_failures}:
        entries, failures = c.sensitivity.get(label, {}), c.sensitivity_failures.get(label, {})
        run = next(iter(entries.values())).run if entries else next(iter(failures.values()))[0]
        curves.setdefault(run.base_setting, {})[run.gain] = (entries, failures)
    for base, curve in curves.items():
        if base in c.entries or base in c.failures:
            curve[1.0] = (c.entries.get(base, {}), c.failures.get(base, {}))
    return {base: dict(sorted(curve.items())) for base, curve in sorted(curves.items())}
