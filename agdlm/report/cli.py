"""`agdlm report RUN_DIRS_OR_SWEEP_DIRS [-o OUT] [--wandb offline|online]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agdlm.report.build import build_report
from agdlm.report.runs import NoRuns

DESCRIPTION = "Compare runs from their own logs (no W&B needed): tables, CSVs and plots in one folder."
EPILOG = """\
The folder holds:

    report.md                 every table below, with the plots embedded
    runs.csv                  one row per run
    vs_adamw.csv              per cell, optimiser setting and seed: final val loss, its ratio to the
                              best-tuned AdamW, to the best-tuned Muon, tokens and seconds to reach
                              tuned AdamW's final val loss
    val_loss_vs_tokens.png    val loss against tokens, one panel per cell, seeds as mean and spread
    lr_transfer.png           per lr-swept optimiser, final val loss against lr, one line per cell
    gain_sensitivity.png      AGD's gain beside AdamW's and Muon's lr (multiples of the default)
    compute_scaling.png       final val loss against training compute across widths, power-law fits
    agd_eta.png               AGD's step size eta and G over training
    agd_roles.png, .csv       AGD per role: share of G, update size, weight growth

A cell is everything but the optimiser's settings and the seed (width, layers, batch,
tokenizer, block size, planned tokens), read from each run's config.yaml. A folder that holds
metrics.jsonl is a run; any other folder is searched (one level) for runs. timing.json beside a
run's metrics.jsonl ({"idle": false, "note": "..."}) marks its timings as not from an idle machine;
such a run takes the seconds per token of the idle runs of its shape and optimiser where there are
any (its cell's other lrs and seeds, or --timing-runs).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agdlm report", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_SWEEP_DIR")
    p.add_argument("-o", "--out", help="report folder (default: <sweep dir>/report for one folder, else ./report)")
    p.add_argument("--title", help="the report's heading")
    p.add_argument("--timing-runs", nargs="+", default=[], metavar="RUN_DIR_OR_SWEEP_DIR",
                   help="runs that give idle seconds per token only (never results): a run that shared its machine "
                        "takes the median of the idle runs of its shape and optimiser")
    p.add_argument("--wandb", choices=("off", "offline", "online"), default="off",
                   help="also log the comparison as one W&B run (the same tables, line plots, the plots as images)")
    p.add_argument("--project", help="W&B project (default: the runs' log.project)")
    p.add_argument("--entity", help="W&B entity (default: the runs' log.entity)")
    p.add_argument("--group", help="W&B group (default: the runs' log.group)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.out or (str(Path(args.paths[0]) / "report") if len(args.paths) == 1 and not
                       (Path(args.paths[0]) / "metrics.jsonl").is_file() else "report")
    try:
        result = build_report(args.paths, out, args.title, args.timing_runs)
    except NoRuns as e:
        print(f"agdlm report: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder: absent parent that cannot be made, a file, no permission
        print(f"agdlm report: cannot write the report to {out}: {e.strerror or e} ({e.filename or out})",
              file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"agdlm report: warning: {warning}", file=sys.stderr)
    print(result["table"])
    if result["ratio_table"]:
        print("\nFinal val loss / best-tuned AdamW's (same cell and seed; mean (per seed)):")
        print(result["ratio_table"])
        print("\nAcross the grid:")
        print(result["ratio_summary"])
        print("\nTokens and time to tuned AdamW's final val loss (medians over cells and seeds):")
        print(result["speed_summary"])
    print(f"\nwrote {result['report']} with {len(result['plots'])} plot(s): "
          + ", ".join(str(p) for p in result["plots"]))
    if args.wandb != "off":
        from agdlm.report.wandb_run import log_report

        local = log_report(result, Path(out), args.wandb, result["title"], args.project, args.entity, args.group)
        print(f"logged the comparison to W&B ({args.wandb}): {local}")
    return 0
