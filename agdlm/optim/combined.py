"""Several optimisers stepped as one, for a method that gives its parameter groups to
different update rules (Muon on hidden matrices, AdamW on the rest). The backends, the
GradScaler and checkpoints see one torch.optim.Optimizer."""

from __future__ import annotations

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        # Optimizer.__init__ is not called: the parts own their groups, state and hooks
        self.parts = parts
        self.defaults = {}
        bound = [part for part in parts.values() if hasattr(part, "bind")]
        if len(bound) > 1:
            raise ValueError("CombinedOptimizer: at most one part may be bound to a sharded backend")
        if bound:  # what a sharded backend binds (its `params` and `bind`), as it binds AGD
            self.params, self.bind = bound[0].params, bound[0].bind

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict:
        # a merged read-only view; not a ChainMap: its lookups would fall through the parts'
        # defaultdicts and plant empty entries for other parts' parameters
        return {p: s for part in self.parts.values() for p, s in part.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for part in self.parts.values():
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(f"optimizer state has parts {sorted(state_dict)}, expected {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(f'{n}={type(p).__name__}' for n, p in self.parts.items())})"
