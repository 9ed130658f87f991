"""Final val loss against training compute across widths, and a power law per setting.

A scaling group is the cells that differ only in width (same depth, tokenizer, batch, block
size and token budget). Per cell and setting the point is the mean over seeds of the tuned
final val loss (swept families at each seed's best lr). L(C) = a C^-b + c is fitted with numpy
only (scipy is not a dependency): for each floor c on a grid below the lowest loss, a
least-squares line through log(L - c) against log C gives a and b; the c whose curve is
closest to the points in L wins, refined by zooming in around it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from agdlm.report.compare import CellComparison
from agdlm.report.runs import fmt_count
from agdlm.report.shapes import flops_per_token

MIN_WIDTHS = 3  # three parameters: fewer points cannot pin a power law with a floor


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    c: float

    def loss(self, compute: float) -> float:
        return self.a * compute ** -self.b + self.c

    def compute_at(self, loss: float) -> float | None:
        """The compute at which the fit reaches `loss`; None at or below its floor c."""
        return (self.a / (loss - self.c)) ** (1.0 / self.b) if loss > self.c else None


def _residual(log_c, losses, floor: float) -> tuple[float, float, float]:
    """(squared residual in L, a, b) of the least-squares line log(L - floor) = p + q log C."""
    import numpy as np

    q, p = np.polyfit(log_c, np.log(losses - floor), 1)
    fitted = np.exp(p + q * log_c) + floor
    return float(np.sum((fitted - losses) ** 2)), math.exp(p), -q


def fit_power_law(compute: list[float], losses: list[float]) -> PowerLaw | None:
    """L(C) = a C^-b + c through the points; None with fewer than MIN_WIDTHS points or where the
    loss does not fall with compute (b <= 0)."""
    import numpy as np

    if len(compute) < MIN_WIDTHS or len(set(compute)) < MIN_WIDTHS:
        return None
    log_c, y = np.log(np.asarray(compute, float)), np.asarray(losses, float)
    low = float(y.min())
    floors = low * (1 - np.geomspace(1e-6, 1.0, 400))  # from just below the lowest loss down to 0
    for _ in range(4):  # zoom: a finer grid between the best floor's neighbours
        scores = [_residual(log_c, y, f)[0] for f in floors]
        k = int(np.argmin(scores))
        around = floors[max(k - 1, 0)], floors[min(k + 1, len(floors) - 1)]
        lo, hi = min(around), max(around)
        floors = np.linspace(lo, hi, 200) if hi > lo else floors[k:k + 1]
    best = min(floors, key=lambda f: _residual(log_c, y, f)[0])
    _, a, b = _residual(log_c, y, float(best))
    return PowerLaw(float(a), float(b), float(best)) if b > 0 else None


@dataclass
class SettingPoints:
    setting: str
    widths: list[int] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # mean over seeds
    low: list[float] = field(default_factory=list)  # min over seeds
    high: list[float] = field(default_factory=list)  # max over seeds
    fit: PowerLaw | None = None


@dataclass
class ScalingGroup:
    key: tuple  # (depth, tokenizer, batch, block size, tokens)
    settings: dict[str, SettingPoints]

    @property
    def label(self) -> str:
        depth, tokenizer, batch, block, tokens = self.key
        return f"{depth} layers · {tokenizer} · batch {batch} · block {block} · {fmt_count(tokens)} tokens"

    @property
    def widths(self) -> list[int]:
        return sorted({w for p in self.settings.values() for w in p.widths})


def scaling_groups(cells: list[CellComparison]) -> list[ScalingGroup]:
    """Groups of two or more widths, each setting's points sorted by compute, fits where it has
    MIN_WIDTHS widths."""
    grouped: dict[tuple, list[CellComparison]] = {}
    for c in cells:
        grouped.setdefault((c.cell.depth, *c.cell.group), []).append(c)
    out = []
    for key, members in sorted(grouped.items()):
        if len({c.cell.width for c in members}) < 2:
            continue
        settings: dict[str, SettingPoints] = {}
        for c in sorted(members, key=lambda c: c.cell.width):
            for setting, per_seed in c.entries.items():
                finals = [e.final for e in per_seed.values()]
                per_token = flops_per_token(next(iter(per_seed.values())).run.config.get("model", {}))
                if per_token is None:
                    continue
                p = settings.setdefault(setting, SettingPoints(setting))
                p.widths.append(c.cell.width)
                p.compute.append(per_token * c.cell.tokens)
                p.loss.append(sum(finals) / len(finals))
                p.low.append(min(finals))
                p.high.append(max(finals))
        for p in settings.values():
            p.fit = fit_power_law(p.compute, p.loss)
        out.append(ScalingGroup(key, settings))
    return out


@dataclass(frozen=True)
class Multiplier:
    """How much less compute a setting needs than the reference for the same loss: C_ref / C."""
    loss: float  # the matched loss
    value: float | None  # None: the setting's fit never reaches that loss
    bound: str = ""  # "more" or "less": the loss ranges do not overlap, and value only bounds it


def compute_multiplier(setting: SettingPoints, reference: SettingPoints) -> Multiplier | None:
    """At the lowest loss both fits reach inside their measured compute. Where their loss ranges
    do not overlap, a fit read far outside its points says nothing, so the measured computes
    give a bound instead: a setting whose smallest model beats the reference's largest needs
    more than C_ref,max / C_min less compute for the reference's best loss; one whose largest
    model trails the reference's smallest, less than C_ref,min / C_max for its own best loss."""
    if setting.fit is None or reference.fit is None:
        return None
    ranges = [(p.fit.loss(max(p.compute)), p.fit.loss(min(p.compute))) for p in (setting, reference)]
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if low > high:  # no loss that both reach
        if ranges[0][1] < ranges[1][0]:
            return Multiplier(ranges[1][0], max(reference.compute) / min(setting.compute), "more")
        return Multiplier(ranges[0][0], min(reference.compute) / max(setting.compute), "less")
    theirs, mine = reference.fit.compute_at(low), setting.fit.compute_at(low)
    return Multiplier(low, theirs / mine if mine and theirs else None)
