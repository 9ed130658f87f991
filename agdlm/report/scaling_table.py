"""The power-law fits per scaling group and setting, and each setting's compute multiplier
against tuned AdamW at a matched loss, as a table."""

from __future__ import annotations

from agdlm.report.markdown import table
from agdlm.report.optimisers import REFERENCE, family_label, setting_order
from agdlm.report.scaling import MIN_WIDTHS, ScalingGroup, SettingPoints, compute_multiplier

SCALING_NOTE = (
    "Each point: a cell's final val loss, the mean over seeds (swept families at each seed's best lr). Fit: "
    "L(C) = a·C^-b + c by least squares (for each floor c, a line through log(L - c) against log C; the c "
    f"closest to the points wins); it needs {MIN_WIDTHS} or more widths, and with exactly {MIN_WIDTHS} it passes "
    "through them (unless the floor is held at 0). Compute multiplier: tuned AdamW's compute for a matched loss "
    "divided by the setting's, both read off the fits; above 1, the setting needs less compute than AdamW for "
    "that loss. The matched loss is the lowest one both fits reach within the compute they were measured at. "
    "Where their losses do not overlap, no fit is read outside its points: a setting whose smallest model "
    "beats AdamW's largest gets \"more than\" AdamW's largest compute over its smallest, at AdamW's best loss; "
    "one whose largest model trails AdamW's smallest gets \"less than\" AdamW's smallest compute over its "
    "largest, at its own best loss.")


def fit_text(p: SettingPoints) -> list[str]:
    if p.fit is not None:
        return [f"{p.fit.a:.4g}", f"{p.fit.b:.3f}", f"{p.fit.c:.4f}"]
    reason = (f"too few widths to fit ({len(set(p.widths))} < {MIN_WIDTHS})" if len(set(p.widths)) < MIN_WIDTHS
              else "no fit: the loss does not fall with compute")
    return [reason, "", ""]


def multiplier_text(p: SettingPoints, reference: SettingPoints | None) -> str:
    if reference is None or p is reference:
        return "-"
    m = compute_multiplier(p, reference)
    if m is None:
        return "-"
    if m.value is None:
        return f"never reaches {m.loss:.4f} (its fitted floor c is above it)"
    if m.bound:
        return f"{m.bound} than {m.value:.3g}x at loss {m.loss:.4f} (the losses do not overlap)"
    return f"{m.value:.3g}x at loss {m.loss:.4f}"


def scaling_markdown(groups: list[ScalingGroup]) -> str:
    head = ["cells", "setting", "widths", "a", "b", "c", "compute multiplier vs tuned AdamW"]
    rows = []
    for g in groups:
        reference = g.settings.get(family_label(REFERENCE))
        for setting in sorted(g.settings, key=setting_order):
            p = g.settings[setting]
            rows.append([g.label, setting, ", ".join(str(w) for w in p.widths), *fit_text(p),
                         multiplier_text(p, reference)])
    return table(head, rows, left=(0, 1, 2, 6))
