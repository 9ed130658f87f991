"""Optimisers: AGD (the rule table in rules.py, the math in agd.py)."""

from agdlm.optim.agd import AGD, LocalBinding, eta_from_G, format_layer_table
from agdlm.optim.rules import POLICIES, RuleError

__all__ = ["AGD", "LocalBinding", "eta_from_G", "format_layer_table", "POLICIES", "RuleError"]
