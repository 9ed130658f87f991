"""`agdlm report ... --wandb offline|online`: the comparison itself as one W&B run (job type
"report") in the runs' group, next to the runs it compares:

    comparison/runs               wandb.Table: one row per run (optimiser, AGD setting, width,
                                  depth, lr, seed, tokens, final/best val loss, tokens/s,
                                  finished, and `agdlm eval` results when present)
    comparison/agd_vs_adamw       wandb.Table of agd_vs_adamw.csv (AGD / best AdamW per cell)
    comparison/val_loss_curves    wandb.Table (run, optimiser, tokens, val_loss) and its line plot
    comparison/val_loss_vs_tokens   W&B line plot, one line per run ("AGD · name", "AdamW · name")
    comparison/lr_transfer        W&B line plot: final val loss against AdamW's lr per width,
                                  AGD as a flat line at its final loss (no lr)
    plots/<name>                  the report's PNGs as images (AGD dashed there: W&B's built-in
                                  line chart has no dash style)

Offline, the run lands in <report>/wandb/offline-run-*/ and syncs later (`wandb sync`).
Online with the `wandb-workspaces` package installed, a W&B Report with those panels is
also saved (best effort: one line if it fails).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

OPTIMISER_LABEL = {"agd": "AGD", "adamw": "AdamW"}


def _common(values: list, default=None):
    """The one value all runs share, else `default`."""
    distinct = {v for v in values if v is not None}
    return distinct.pop() if len(distinct) == 1 else default


def runs_table(runs: list, downstream_columns: list[str]):
    import wandb

    columns = ["run", "optimiser", "agd", "n_embd", "n_layer", "lr", "seed", "tokens", "final_val_loss",
               "best_val_loss", "tokens_per_s", "finished", *downstream_columns]
    rows = [[r.name, OPTIMISER_LABEL.get(r.optimiser, r.optimiser), r.agd_label or "", r.width, r.depth, r.lr,
             r.seed, r.tokens, r.final_val_loss, r.best_val_loss, r.tokens_per_s, r.done,
             *(r.downstream.get(c) for c in downstream_columns)] for r in runs]
    return wandb.Table(columns=columns, data=rows, allow_mixed_types=True)


def curves_table(runs: list):
    import wandb

    rows = [[f"{OPTIMISER_LABEL.get(r.optimiser, r.optimiser)} · {r.name}", r.optimiser, e["tokens"], e["val_loss"]]
            for r in runs for e in r.evals()]
    return wandb.Table(columns=["run", "optimiser", "tokens", "val_loss"], data=rows)


def lr_transfer_table(runs: list, size_label):
    """(series, lr, final val loss): AdamW per width at each lr; AGD per width as a flat line
    across the same lrs (finished runs only, as the PNG draws them)."""
    import wandb

    finished = [r for r in runs if r.done and r.final_val_loss is not None]
    lrs = sorted({r.lr for r in finished if r.optimiser == "adamw"})
    rows = []
    for r in finished:
        label = size_label(r, finished)
        if r.optimiser == "adamw":
            rows.append([f"AdamW {label}", r.lr, r.final_val_loss])
        elif r.optimiser == "agd":
            rows += [[f"AGD {r.agd_label} {label} (no lr)", lr, r.final_val_loss] for lr in lrs]
    rows.sort(key=lambda row: (row[0], row[1]))
    return wandb.Table(columns=["series", "lr", "final_val_loss"], data=rows)


def csv_table(path: Path):
    import wandb

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return wandb.Table(columns=rows[0], data=rows[1:], allow_mixed_types=True)


def log_report(result: dict, out: Path, mode: str, title: str, project: str | None = None,
               entity: str | None = None, group: str | None = None) -> Path:
    """Log the report `build_report` returned as one W&B run; returns the run's local folder."""
    import wandb

    from agdlm.metrics import resolve_wandb_mode
    from agdlm.report import downstream_columns, size_label

    runs = result["runs"]
    logs = [r.config.get("log", {}) for r in runs]
    project = project or _common([lg.get("project") for lg in logs], "agdlm")
    entity = entity or _common([lg.get("entity") for lg in logs])
    group = group or _common([lg.get("group") for lg in logs])
    mode = resolve_wandb_mode(mode)
    run = wandb.init(mode=mode, dir=str(out), project=project, entity=entity, group=group, job_type="report",
                     name=title, settings=wandb.Settings(console="off"),
                     config={"title": title, "runs": [r.name for r in runs], "run_dirs": [str(r.path) for r in runs]})
    curves = curves_table(runs)
    transfer = lr_transfer_table(runs, size_label)
    data = {
        "comparison/runs": runs_table(runs, downstream_columns(runs)),
        "comparison/val_loss_curves": curves,
        "comparison/val_loss_vs_tokens": wandb.plot.line(curves, "tokens", "val_loss", stroke="run",
                                                         title="Validation loss against tokens seen"),
    }
    if len(transfer.data):
        data["comparison/lr_transfer"] = wandb.plot.line(
            transfer, "lr", "final_val_loss", stroke="series",
            title="Final val loss against AdamW's lr (AGD: flat, no lr)")
    ratio_csv = out / "agd_vs_adamw.csv"
    if ratio_csv.is_file():
        data["comparison/agd_vs_adamw"] = csv_table(ratio_csv)
    for plot in result["plots"]:
        data[f"plots/{Path(plot).stem}"] = wandb.Image(str(plot))
    run.log(data)
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
                           description=f"AGD against AdamW ({group or project}); summary run: {run_url or '-'}",
                           blocks=[
                               wr.H1(text=title),
                               wr.PanelGrid(runsets=[runset], panels=[
                                   wr.LinePlot(title="val loss against tokens", x="tokens", y=["val_loss"]),
                                   wr.LinePlot(title="AGD step size", x="tokens", y=["agd_eta"]),
                               ]),
                               wr.PanelGrid(runsets=[runset], panels=[
                                   wr.WeavePanelSummaryTable(table_name="comparison/runs"),
                                   wr.MediaBrowser(title="report plots", media_keys=[f"plots/{p}" for p in plots]),
                               ]),
                           ])
        report.save()
        print(f"agdlm report: W&B report {report.url}")
    except Exception as e:  # noqa: BLE001 - optional: the summary run is already logged
        print(f"agdlm report: warning: the W&B Report was not saved ({' '.join(str(e).split())[:200]})",
              file=sys.stderr)
