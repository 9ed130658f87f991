"""`agdlm report`: compare runs from their own logs (config.yaml, metrics.jsonl, DONE).

Imports go one way, down this list; no module imports one above it:

    cli            the command line (main)
    wandb_run      the same tables and plots as one W&B run
    build          reads, compares, writes the folder (PLOTS: the PNGs and their titles)
    document       report.md's text and notes
    plots/         one module per family of figures, style.py shared
    compare_tables, scaling_table, tables, roles   the tables (markdown, CSV)
    markdown       table text and number formats
    scaling        compute per run, power-law fits, compute multipliers
    compare        every setting against the tuned AdamW per cell and seed
    runs           reading run folders: RunLog, Cell
    optimisers     the optimiser families and how a setting is named
    shapes         parameters and FLOPs per token from the model's shape
"""

from agdlm.report.build import build_report
from agdlm.report.cli import main
from agdlm.report.runs import Cell, RunLog, find_runs, read_runs

__all__ = ["Cell", "RunLog", "build_report", "find_runs", "main", "read_runs"]
