"""The optimiser families the report knows, and how a run's optim section names its setting.

Lr-swept families (AdamW, Muon, schedule-free) are compared at their best learning rate per
cell and seed; the others (AGD's settings, Prodigy) are learning-rate free and appear as run.
An optim.name the report does not know is shown by its name and treated as learning-rate free."""

from __future__ import annotations

from agdlm.sweep import short_number

FAMILY_LABEL = {"agd": "AGD", "adamw": "AdamW", "muon": "Muon", "schedulefree": "Schedule-free",
                "prodigy": "Prodigy"}
LR_SWEPT = ("adamw", "muon", "schedulefree")
REFERENCE = "adamw"  # every ratio is against this family's best lr in the same cell and seed
MUON = "muon"
FAITHFUL_AGD = "AGD default"  # round 1's baseline setting, for the "beats AGD default" column


def family_label(name: str) -> str:
    return FAMILY_LABEL.get(name, name)


def family_rank(name: str) -> int:
    """AGD first, then the reference, the other swept families, Prodigy, anything else."""
    order = list(FAMILY_LABEL)
    return order.index(name) if name in order else len(order)


def agd_label(optim: dict) -> str:
    """AGD's setting as one name: policy, +variant unless faithful, gain unless 1."""
    label = str(optim.get("policy", "default"))
    if str(optim.get("variant", "none")) != "none":
        label += f"+{optim['variant']}"
    gain = float(optim.get("gain", 1.0))
    return label + (f" gain {short_number(gain)}" if gain != 1.0 else "")


def setting_label(optim: dict) -> str:
    """The name a setting goes by in every table and legend: `AGD default+spectral`, `Muon`
    (a swept family: its best lr is chosen per cell and seed), `Prodigy`, `Prodigy lr 0.5`."""
    name = str(optim.get("name", "?"))
    if name == "agd":
        return f"AGD {agd_label(optim)}"
    if name in LR_SWEPT:
        return family_label(name)
    lr = optim.get("lr")
    fixed = name == "prodigy" and lr is not None and float(lr) != 1.0  # Prodigy's lr is a multiplier, 1 by design
    return family_label(name) + (f" lr {short_number(float(lr))}" if fixed else "")


def setting_order(label: str) -> tuple:
    """Sort key for settings: family order, the faithful AGD first, then by name."""
    family = next((name for name, text in FAMILY_LABEL.items() if label.split(" ")[0] == text), label)
    return (family_rank(family), label != FAITHFUL_AGD, label)
