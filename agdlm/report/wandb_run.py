"""`agdlm report ... --wandb offline|online`: the comparison itself as one W&B run (job type
"report") in the runs' group, next to the runs it compares. It carries report.md's tables and
plots:

    comparison/runs               one row per run (optimiser, setting, shape, lr, seed, losses,
                                  tokens/s, finished, `agdlm eval` results when present)
    comparison/ratios             the ratio matrix: cells x settings, against tuned AdamW
    comparison/summary            the grid summary per setting (mean/worst ratio, within 5%,
                                  beats tuned Muon, beats AGD default, failures)
    comparison/speed              tokens and time to tuned AdamW's loss, per setting
    comparison/top_two            per cell, the top two settings and the third-seed rule
    comparison/details            per cell, setting and seed (report.md's per-cell tables)
    comparison/vs_adamw           vs_adamw.csv (every number, per run)
    comparison/gain_sensitivity   AGD's gain table, comparison/scaling the power-law fits,
                                  comparison/agd_roles the per-role diagnostics (where present)
    comparison/val_loss_curves    (run, optimiser, tokens, val_loss) and its line plot
    comparison/val_loss_vs_tokens
    comparison/lr_transfer        W&B line plot: per swept family and cell, final val loss
                                  (seed mean) against lr
    plots/<name>                  the report's PNGs as images

Offline, the run lands in <report>/wandb/offline-run-*/ and syncs later (`wandb sync`).
Online with the `wandb-workspaces` package installed, a W&B Report with those panels is
also saved (best effort: one line if it fails).
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from agdlm.report.build import COMPARISON_CSV
from agdlm.report.markdown import parse
from agdlm.report.optimisers import LR_SWEPT, family_label
from agdlm.report.runs import RunLog
from agdlm.report.tables import downstream_columns


def _common(values: list, default=None):
    """The one value all runs share, else `default`."""
    distinct = {v for v in values if v is not None}
    return distinct.pop() if len(distinct) == 1 else default


def runs_table(runs: list[RunLog]):
    import wandb

    extra = downstream_columns(runs)
    columns = ["run", "optimiser", "setting", "n_embd", "n_layer", "lr", "seed", "tokens", "final_val_loss",
               "best_val_loss", "tokens_per_s", "seconds_per_token", "timing_idle", "finished", *extra]
    rows = [[r.name, family_label(r.optimiser), r.setting, r.width, r.depth, r.lr, r.seed, r.tokens,
             r.final_val_loss, r.best_val_loss, r.tokens_per_s, r.seconds_per_token, r.timed_idle, r.done,
             *(r.downstream.get(c) for c in extra)] for r in runs]
    return wandb.Table(columns=columns, data=rows, allow_mixed_types=True)


def curves_table(runs: list[RunLog]):
    import wandb

    rows = [[f"{family_label(r.optimiser)} · {r.name}", r.optimiser, e["tokens"], e["val_loss"]]
            for r in runs for e in r.evals()]
    return wandb.Table(columns=["run", "optimiser", "tokens", "val_loss"], data=rows)


def lr_transfer_table(runs: list[RunLog]):
    """(series, lr, final val loss): per swept family and cell, the seed mean at each lr of the
    finished runs, as lr_transfer.png draws it (one series per cell, never mixing cells)."""
    import wandb

    finals: dict[tuple[str, float], list[float]] = {}
    for r in runs:
        if r.optimiser in LR_SWEPT and r.usable:
            finals.setdefault((f"{family_label(r.optimiser)} · {r.cell.label}", r.lr), []).append(r.final_val_loss)
    rows = sorted([series, lr, statistics.mean(v)] for (series, lr), v in finals.items())
    return wandb.Table(columns=["series", "lr", "final_val_loss"], data=rows)


def markdown_table(markdown: str, first: dict[str, str] | None = None):
    """report.md's table as a wandb.Table; `first` adds leading columns of one value each."""
    import wandb

    head, rows = parse(markdown)
    first = first or {}
    return wandb.Table(columns=[*first, *head], data=[[*first.values(), *row] for row in rows])


def details_table(details: dict[str, str]):
    """Every cell's detail table as one table with a `cell` column."""
    import wandb

    columns, rows = None, []
    for cell, markdown in details.items():
        head, mine = parse(markdown)
        columns = ["cell", *head]
        rows += [[cell, *row] for row in mine]
    return wandb.Table(columns=columns, data=rows)


def csv_table(path: Path):
    import wandb

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return wandb.Table(columns=rows[0], data=rows[1:], allow_mixed_types=True)


def comparison_data(result: dict, out: Path) -> dict:
    """Every table and plot of the report, keyed as the W&B run logs them."""
    import wandb

    runs = result["runs"]
    curves = curves_table(runs)
    transfer = lr_transfer_table(runs)
    data = {
        "comparison/runs": runs_table(runs),
        "comparison/val_loss_curves": curves,
        "comparison/val_loss_vs_tokens": wandb.plot.line(curves, "tokens", "val_loss", stroke="run",
                                                         title="Validation loss against tokens seen"),
    }
    if len(transfer.data):
        data["comparison/lr_transfer"] = wandb.plot.line(
            transfer, "lr", "final_val_loss", stroke="series",
            title="Final val loss against lr, per swept optimiser and cell (seed mean)")
    for key, name in (("ratio_table", "ratios"), ("ratio_summary", "summary"), ("speed_summary", "speed"),
                      ("gain_table", "gain_sensitivity"), ("scaling_table", "scaling"), ("roles_table", "agd_roles"),
                      ("ties_table", "top_two")):
        if result.get(key):
            data[f"comparison/{name}"] = markdown_table(result[key])
    if result.get("details"):
        data["comparison/details"] = details_table(result["details"])
    if (out / COMPARISON_CSV).is_file():
        data["comparison/vs_adamw"] = csv_table(out / COMPARISON_CSV)
    for plot in result["plots"]:
        data[f"plots/{Path(plot).stem}"] = wandb.Image(str(plot))
    return data


def log_report(result: dict, out: Path, mode: str, title: str, project: str | None = None,
               entity: str | None = None, group: str | None = None) -> Path:
    """Log the report `build_report` returned as one W&B run; returns the run's local folder."""
    import wandb

    from agdlm.metrics import resolve_wandb_mode

    runs = result["runs"]
    logs = [r.config.get("log", {}) for r in runs]
    project = project or _common([lg.get("project") for lg in logs], "agdlm")
    entity = entity or _common([lg.get("entity") for lg in logs])
    group = group or _common([lg.get("group") for lg in logs])
    mode = resolve_wandb_mode(mode)
    run = wandb.init(mode=mode, dir=str(out), project=project, entity=entity, group=group, job_type="report",
                     name=title, settings=wandb.Settings(console="off"),
                     config={"title": title, "runs": [r.name for r in runs], "run_dirs": [str(r.path) for r in runs]})
    run.log(comparison_data(result, out))
    finals = [r.final_val_loss for r in runs if r.final_val_loss is not None]
    run.summary.update({"runs": len(runs), "best_final_val_loss": min(finals) if finals else None})
    local = Path(run.dir).parent
    url = run.url if mode == "online" else None
    run.finish()
    if mode == "online":
        save_wandb_report(project, entity, group, title, [Path(p).stem for p in result["plots"]], url)
    return local


def save_wandb_report(project: str, entity: str | None, group: str | None, title: str, plots: list[str],
                      run_url: str | None) -> None:
    """A W&B Report of the group's runs with the comparison's panels; needs wandb-workspaces
    and a connection, so it is optional and never fails the command."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return
    try:
        runset = wr.Runset(entity=entity or "", project=project, name=group or project)
        report = wr.Report(project=project, entity=entity or "", title=f"agdlm: {title}",
                           description=f"Every optimiser against tuned AdamW ({group or project}); "
                                       f"summary run: {run_url or '-'}",
                           blocks=[
                               wr.H1(text=title),
                               wr.PanelGrid(runsets=[runset], panels=[
                                   wr.LinePlot(title="val loss against tokens", x="tokens", y=["val_loss"]),
                                   wr.LinePlot(title="AGD step size", x="tokens", y=["agd_eta"]),
                               ]),
                               wr.PanelGrid(runsets=[runset], panels=[
                                   wr.WeavePanelSummaryTable(table_name="comparison/summary"),
                                   wr.WeavePanelSummaryTable(table_name="comparison/runs"),
                                   wr.MediaBrowser(title="report plots", media_keys=[f"plots/{p}" for p in plots]),
                               ]),
                           ])
        report.save()
        print(f"agdlm report: W&B report {report.url}")
    except Exception as e:  # noqa: BLE001 - optional: the summary run is already logged
        print(f"agdlm report: warning: the W&B Report was not saved ({' '.join(str(e).split())[:200]})",
              file=sys.stderr)
