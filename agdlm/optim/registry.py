"""The one way in for every optimiser: `optim.name` -> its OptimiserKind (agdlm.optim.kind).
The trainer and the backends ask the kind; none of them names an optimiser. Adding one
touches optim/, configs/optim/ and its tests only."""

from __future__ import annotations

from agdlm.optim.adamw import AdamWKind
from agdlm.optim.agd_kind import AGDKind
from agdlm.optim.kind import OptimiserKind, OptimiserRefused
from agdlm.optim.muon import MuonKind
from agdlm.optim.prodigy import ProdigyKind
from agdlm.optim.schedule_free import ScheduleFreeKind

KINDS: dict[str, OptimiserKind] = {k.name: k for k in (AGDKind(), AdamWKind(), MuonKind(), ProdigyKind(),
                                                        ScheduleFreeKind())}
NAMES = tuple(KINDS)


def kind_of(name: str) -> OptimiserKind:
    return KINDS[name]


__all__ = ["KINDS", "NAMES", "OptimiserKind", "OptimiserRefused", "kind_of"]
