"""AGD's diagnostics per role (embedding, head, attention, ...): share of G, update size
||dW||/||W||, weight growth ||W||/||W0||, for one run per AGD setting."""

from __future__ import annotations

import csv
from pathlib import Path

from agdlm.report.optimisers import FAITHFUL_AGD
from agdlm.report.runs import RunLog, finite

ROLE_METRICS = {  # metrics.jsonl prefix -> what it measures
    "agd_share": "share of G",
    "agd_rel_update": "update size ‖dW‖/‖W‖",
    "agd_weight_ratio": "weight growth ‖W‖/‖W0‖",
}

ROLES_NOTE = (
    "One AGD run per setting (the widest cell, lowest seed); final logged values. share of G: the role's part "
    "of AGD's gradient summary G. update size: ‖dW‖_F / ‖W‖_F of the last step. weight growth: "
    "‖W‖_F / ‖W0‖_F (not logged by older runs).")


def role_series(run: RunLog, metric: str) -> dict[str, tuple[list[float], list[float]]]:
    """role -> (tokens, values) of `metric/<role>` over the run's train records (roles in log order)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    prefix = metric + "/"
    for record in run.trains():
        for key, value in record.items():
            if key.startswith(prefix) and finite(value):
                tokens, values = series.setdefault(key[len(prefix):], ([], []))
                tokens.append(record["tokens"])
                values.append(value)
    return series


def representative_agd_runs(runs: list[RunLog]) -> dict[str, RunLog]:
    """One AGD run per label that logged per-role metrics: the widest (then deepest) cell, lowest
    seed; gain runs left out (the sensitivity curve is about the loss, not the roles)."""
    chosen: dict[str, RunLog] = {}
    for r in runs:
        if r.optimiser != "agd" or r.sensitivity or not role_series(r, "agd_share"):
            continue
        key = (-r.width, -r.depth, r.seed, r.name)
        current = chosen.get(r.agd_label)
        if current is None or key < (-current.width, -current.depth, current.seed, current.name):
            chosen[r.agd_label] = r
    return dict(sorted(chosen.items(), key=lambda item: (f"AGD {item[0]}" != FAITHFUL_AGD, item[0])))


def logged_role_metrics(chosen: dict[str, RunLog]) -> list[str]:
    """The per-role metrics some chosen run logged (older runs lack agd_weight_ratio)."""
    return [m for m in ROLE_METRICS if any(role_series(r, m) for r in chosen.values())]


def role_final_rows(runs: list[RunLog]) -> list[dict]:
    """Per AGD label and role: the last logged value of each per-role metric (None if not logged)."""
    chosen = representative_agd_runs(runs)
    metrics = logged_role_metrics(chosen)
    rows = []
    for label, run in chosen.items():
        finals = {m: {role: values[-1] for role, (_, values) in role_series(run, m).items()} for m in metrics}
        for role in dict.fromkeys(role for m in metrics for role in finals[m]):
            rows.append({"agd": label, "run": run.name, "role": role,
                         **{m: finals[m].get(role) for m in metrics}})
    return rows


def role_markdown(rows: list[dict]) -> str:
    metrics = [m for m in ROLE_METRICS if m in rows[0]]
    lines = ["| AGD | run | role | " + " | ".join(ROLE_METRICS[m] for m in metrics) + " |",
             "|---|---|---|" + "---:|" * len(metrics)]
    for row in rows:
        values = ["-" if row[m] is None else f"{row[m]:.4g}" for m in metrics]
        lines.append(f"| {row['agd']} | {row['run']} | {row['role']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_role_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
