"""Compare runs from their own logs (no W&B needed): `agdlm report RUN_DIRS_OR_SWEEP_DIRS [-o OUT]`.

Reads each run's config.yaml and metrics.jsonl and writes a self-contained folder:

    report.md                 the table below, with the plots embedded
    runs.csv                  the same table, for spreadsheets
    val_loss_vs_tokens.png    validation loss against tokens seen, one panel per optimiser
    lr_transfer.png           final val loss against AdamW's learning rate, one line per width,
                              AGD (no learning rate) as a horizontal line in the width's colour
    agd_eta.png               AGD's step size eta and G over steps
    agd_vs_adamw.csv          per cell (width, layers, batch, tokenizer, block size, tokens), AGD
                              setting and seed: AGD's final val loss / the best AdamW's over its
                              learning rates (the same table, averaged over seeds, is in report.md)
    agd_roles.png, .csv       per role (embedding, head, attention, ...): share of G, update size
                              ||dW||/||W||, weight growth ||W||/||W0||, for one run per AGD setting

A folder that holds metrics.jsonl is a run; any other folder is searched (one level) for runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agdlm.eval_results import headline_values, read_results
from agdlm.sweep import short_number

DPI = 90
OPTIMISER_LABEL = {"agd": "AGD", "adamw": "AdamW"}
LINESTYLES = ["-", "--", "-.", ":", (0, (3, 1, 1, 1, 1, 1)), (0, (5, 2)), (0, (1, 2))]


@dataclass(frozen=True, order=True)
class Cell:
    """One experiment of a study grid: runs in a cell differ only in optimiser settings and seed."""
    width: int
    depth: int
    tokenizer: str
    batch: int  # sequences per optimiser step (train.global_batch_size)
    block_size: int
    tokens: int  # planned: train.max_tokens, or max_steps x batch x block_size


@dataclass
class RunLog:
    name: str
    path: Path
    config: dict
    records: list[dict] = field(default_factory=list)
    done: bool = False
    malformed_lines: list[int] = field(default_factory=list)  # metrics.jsonl lines skipped (1-based)
    downstream: dict[str, float] = field(default_factory=dict)  # eval.json's headline values (`agdlm eval`)

    @property
    def optimiser(self) -> str:
        return self.config.get("optim", {}).get("name", "?")

    @property
    def lr(self) -> float | None:
        return float(self.config["optim"]["lr"]) if self.optimiser == "adamw" else None

    @property
    def width(self) -> int:
        return int(self.config.get("model", {}).get("n_embd", 0))

    @property
    def depth(self) -> int:
        return int(self.config.get("model", {}).get("n_layer", 0))

    @property
    def seed(self) -> int:
        return int(self.config.get("train", {}).get("seed", 0))

    @property
    def agd_label(self) -> str | None:
        """AGD's setting as one name: policy, +variant unless faithful, gain unless 1."""
        if self.optimiser != "agd":
            return None
        optim = self.config.get("optim", {})
        label = str(optim.get("policy", "default"))
        if str(optim.get("variant", "none")) != "none":
            label += f"+{optim['variant']}"
        gain = float(optim.get("gain", 1.0))
        return label + (f" gain {short_number(gain)}" if gain != 1.0 else "")

    @property
    def cell(self) -> Cell:
        """Everything that defines the experiment except the optimiser's settings and the seed."""
        model, data, train = (self.config.get(k, {}) for k in ("model", "data", "train"))
        batch, block = int(train.get("global_batch_size", 0)), int(model.get("block_size", 0))
        max_tokens = train.get("max_tokens")
        planned = int(max_tokens) if max_tokens is not None else int(train.get("max_steps", 0)) * batch * block
        return Cell(self.width, self.depth, str(data.get("tokenizer", "gpt2")), batch, block, planned)

    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "eval" and _finite(r.get("val_loss"))]

    def trains(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "train"]

    @property
    def final_val_loss(self) -> float | None:
        evals = self.evals()
        return evals[-1]["val_loss"] if evals else None

    @property
    def best_val_loss(self) -> float | None:
        evals = self.evals()
        return min(r["val_loss"] for r in evals) if evals else None

    @property
    def tokens(self) -> int:
        return max((int(r.get("tokens", 0)) for r in self.records), default=0)

    @property
    def tokens_per_s(self) -> float | None:
        rates = [r["tokens_per_s"] for r in self.trains() if _finite(r.get("tokens_per_s"))]
        return statistics.median(rates) if rates else None

    @property
    def params(self) -> int | None:
        return count_params(self.config.get("model", {}))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def count_params(model: dict) -> int | None:
    """All parameters of the GPT the config describes (tied weights once), built on the meta device."""
    try:
        import torch

        from agdlm.model import GPT, GPTConfig

        known = {k: v for k, v in model.items() if k in GPTConfig.__dataclass_fields__}
        with torch.device("meta"):
            return GPT(GPTConfig(**known)).num_params(non_embedding=False)
    except Exception:  # a config this version cannot build: leave the cell empty
        return None


# ---- reading runs ---------------------------------------------------------------------

class BadRun(Exception):
    """A run folder the report cannot read: named in one line, and the report goes on."""


class NoRuns(FileNotFoundError):
    """Nothing to report on: no run folder among the paths, or none readable."""


def first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def read_config(path: Path) -> dict:
    """config.yaml as a mapping of sections ({} when the folder has none)."""
    file = path / "config.yaml"
    if not file.is_file():
        return {}
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BadRun(f"{file}: unreadable ({first_line(e)})") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise BadRun(f"{file}: not a mapping of sections")
    return config


def parse_record(raw: bytes) -> dict | None:
    """One metrics line as a record, or None when it is not one (cut, garbage, wrong shape)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except ValueError:  # not UTF-8, not JSON
        return None
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return None
    if not (_finite(record.get("step")) and _finite(record.get("tokens"))):
        return None
    return record


def read_metrics(path: Path) -> tuple[list[dict], list[int]]:
    """The records of metrics.jsonl and the numbers of the lines that were not records."""
    file = path / "metrics.jsonl"
    try:
        data = file.read_bytes()
    except OSError as e:
        raise BadRun(f"{file}: unreadable ({e.strerror})") from None
    records, malformed = [], []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            record = parse_record(raw)
            if record is None:
                malformed.append(number)
            else:
                records.append(record)
    if malformed and not records:
        raise BadRun(f"{file}: no readable record ({len(malformed)} malformed line(s))")
    return records, malformed


def read_run(path: Path) -> RunLog:
    """A run folder as a RunLog; BadRun (one line naming the file) when it cannot be read."""
    path = Path(path)
    config = read_config(path)
    records, malformed = read_metrics(path)
    name = str(config.get("train", {}).get("run_name") or path.name)
    run = RunLog(name, path, config, records, (path / "DONE").is_file(), malformed,
                 headline_values(read_results(path)))
    try:  # every config value the report reads, read once here, so a bad one names its file
        sort_key(run), run.cell, run.agd_label
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadRun(f"{path / 'config.yaml'}: cannot read the run's settings ({type(e).__name__}: {e})") from None
    return run


def malformed_warning(run: RunLog) -> str | None:
    lines = run.malformed_lines
    if not lines:
        return None
    shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
    return f"{run.path / 'metrics.jsonl'}: skipped {len(lines)} malformed line(s) (line {shown})"


def read_runs(paths: list[str | Path]) -> tuple[list[RunLog], list[str]]:
    """The runs under `paths`, sorted, and one warning line per run that was skipped or partly read."""
    run_dirs: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            run_dirs.append(p)
        elif p.is_dir():
            run_dirs += sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file())
        else:
            raise NoRuns(f"{p}: not a run folder (with metrics.jsonl) nor a folder of runs")
    seen, runs, warnings = set(), [], []
    for d in run_dirs:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        try:
            run = read_run(d)
        except BadRun as e:
            warnings.append(f"skipped run {d}: {e}")
            continue
        runs.append(run)
        warnings += filter(None, [malformed_warning(run)])
    return sorted(runs, key=sort_key), warnings


def find_runs(paths: list[str | Path]) -> list[RunLog]:
    return read_runs(paths)[0]


def sort_key(run: RunLog):
    return (run.depth, run.width, run.optimiser != "agd", run.lr or 0.0, run.seed, run.name)


def size_label(run: RunLog, runs: list[RunLog]) -> str:
    depths = {r.depth for r in runs}
    return f"w{run.width}" if len(depths) <= 1 else f"L{run.depth} w{run.width}"


# ---- the table ------------------------------------------------------------------------

def optimiser_text(run: RunLog) -> str:
    """`AdamW`, `AGD`, or `AGD (modular+spectral)` when not the faithful default policy."""
    label = run.agd_label
    name = OPTIMISER_LABEL.get(run.optimiser, run.optimiser)
    return name if label in (None, "default") else f"{name} ({label})"


COLUMNS = ["run", "optimiser", "lr", "params", "tokens", "final val loss", "best val loss", "tokens/s"]


def fmt_count(n: int | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def fmt_loss(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else ""


def table_rows(runs: list[RunLog]) -> list[dict]:
    rows = []
    for r in runs:
        rows.append({
            "run": r.name + ("" if r.done else " *"),
            "optimiser": optimiser_text(r),
            "lr": short_number(r.lr) if r.lr is not None else "-",
            "params": fmt_count(r.params),
            "tokens": fmt_count(r.tokens),
            "final val loss": fmt_loss(r.final_val_loss),
            "best val loss": fmt_loss(r.best_val_loss),
            "tokens/s": f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "",
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    right = {"lr", "params", "tokens", "final val loss", "best val loss", "tokens/s"}
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def downstream_columns(runs: list[RunLog]) -> list[str]:
    """The `agdlm eval` results some run has (eval.json), in first-seen order."""
    return list(dict.fromkeys(column for r in runs for column in r.downstream))


def write_csv(runs: list[RunLog], path: Path) -> None:
    extra = downstream_columns(runs)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "finished", "optimiser", "lr", "n_layer", "n_embd", "seed", "params", "tokens",
                    "final_val_loss", "best_val_loss", "tokens_per_s", "run_dir", *extra])
        for r in runs:
            w.writerow([r.name, r.done, r.optimiser, r.lr if r.lr is not None else "", r.depth, r.width, r.seed,
                        r.params or "", r.tokens, r.final_val_loss, r.best_val_loss, r.tokens_per_s, str(r.path),
                        *(r.downstream.get(c, "") for c in extra)])


def downstream_markdown(runs: list[RunLog]) -> str | None:
    """One row per run with `agdlm eval` results: val loss on a shared source, choice accuracy."""
    columns = downstream_columns(runs)
    if not columns:
        return None
    lines = ["| run | optimiser | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for r in (r for r in runs if r.downstream):
        values = [f"{r.downstream[c]:.4f}" if c in r.downstream else "" for c in columns]
        lines.append(f"| {r.name} | {optimiser_text(r)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def width_colours(runs: list[RunLog]) -> dict[str, tuple]:
    plt = _pyplot()
    labels = sorted({size_label(r, runs) for r in runs}, key=lambda s: [int(t[1:]) for t in s.split()])
    cmap = plt.get_cmap("viridis" if len(labels) > 10 else "tab10")
    n = max(1, len(labels) - 1)
    return {lab: cmap(i / n if len(labels) > 10 else i) for i, lab in enumerate(labels)}


def plot_val_loss(runs: list[RunLog], path: Path) -> bool:
    plotted = [r for r in runs if r.evals()]
    if not plotted:
        return False
    plt = _pyplot()
    optimisers = sorted({r.optimiser for r in plotted}, key=lambda o: (o != "agd", o))
    colours = width_colours(plotted)
    lrs = sorted({r.lr for r in plotted if r.lr is not None})
    agd_labels = sorted({r.agd_label for r in plotted if r.agd_label is not None}, key=lambda lab: (lab != "default", lab))
    fig, axes = plt.subplots(1, len(optimisers), figsize=(5.2 * len(optimisers), 4.2), sharey=True, squeeze=False)
    for ax, opt in zip(axes[0], optimisers):
        for r in (r for r in plotted if r.optimiser == opt):
            ev = r.evals()
            if r.lr is not None:  # AdamW: one line style per learning rate, AGD: one per setting
                style = LINESTYLES[lrs.index(r.lr) % len(LINESTYLES)]
            else:
                style = LINESTYLES[agd_labels.index(r.agd_label) % len(LINESTYLES)] if r.agd_label else "-"
            setting = f", lr {short_number(r.lr)}" if r.lr is not None else (
                f", {r.agd_label}" if len(agd_labels) > 1 else "")
            label = size_label(r, plotted) + setting + (
                f", seed {r.seed}" if len({x.seed for x in plotted}) > 1 else "")
            ax.plot([e["tokens"] for e in ev], [e["val_loss"] for e in ev], color=colours[size_label(r, plotted)],
                    linestyle=style, linewidth=1.4, marker="." if len(ev) < 30 else None, label=label)
        ax.set_title(OPTIMISER_LABEL.get(opt, opt))
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if len(ax.lines) <= 12 else 2)
    axes[0][0].set_ylabel("validation loss")
    fig.suptitle("Validation loss against tokens seen")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def plot_lr_transfer(runs: list[RunLog], path: Path) -> bool:
    """Final val loss vs AdamW lr per width (mean over seeds), AGD as a horizontal line."""
    finals = [r for r in runs if r.final_val_loss is not None]
    adamw = [r for r in finals if r.optimiser == "adamw"]
    if not adamw:
        return False
    plt = _pyplot()
    colours = width_colours(finals)
    fig, ax = plt.subplots(figsize=(7, 4.6))
    lr_min, lr_max = min(r.lr for r in adamw), max(r.lr for r in adamw)
    unfinished_label = "unfinished run (last eval)"
    for size, colour in colours.items():
        by_lr: dict[float, list[float]] = {}
        for r in adamw:
            if size_label(r, finals) != size:
                continue
            if r.done:
                by_lr.setdefault(r.lr, []).append(r.final_val_loss)
            else:  # stopped early (diverged, killed): its last eval, apart from the line
                ax.plot([r.lr], [r.final_val_loss], color=colour, marker="x", markersize=8, linestyle="none",
                        label=unfinished_label)
                unfinished_label = None
        if by_lr:
            xs = sorted(by_lr)
            ys = [statistics.mean(by_lr[x]) for x in xs]
            ax.plot(xs, ys, color=colour, marker="o", linewidth=1.6, label=f"AdamW {size}")
            best = min(range(len(xs)), key=ys.__getitem__)
            ax.plot([xs[best]], [ys[best]], color=colour, marker="*", markersize=13, linestyle="none")
        # finished AGD runs only, as for AdamW's line: a killed or diverged run would skew it
        agd = [r.final_val_loss for r in finals if r.optimiser == "agd" and r.done and size_label(r, finals) == size]
        if agd:
            ax.axhline(statistics.mean(agd), color=colour, linestyle="--", linewidth=1.4, label=f"AGD {size} (no lr)")
    ax.set_xscale("log")
    ax.set_xlim(lr_min / 1.6, lr_max * 1.6)
    ax.set_xlabel("AdamW peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("Learning-rate transfer: AdamW per lr (star: best), AGD dashed", fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def plot_agd_eta(runs: list[RunLog], path: Path) -> bool:
    agd = [r for r in runs if r.optimiser == "agd" and any("agd_eta" in t for t in r.trains())]
    if not agd:
        return False
    plt = _pyplot()
    colours = width_colours(agd)
    fig, (ax_eta, ax_g) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in agd:
        tr = [t for t in r.trains() if _finite(t.get("agd_eta"))]
        colour = colours[size_label(r, agd)]
        ax_eta.plot([t["step"] for t in tr], [t["agd_eta"] for t in tr], color=colour, label=r.name)
        ax_g.plot([t["step"] for t in tr], [t["agd_G"] if _finite(t.get("agd_G")) else math.nan for t in tr],
                  color=colour, label=r.name)
    ax_eta.set_title("AGD step size eta")
    ax_g.set_title("AGD G (gradient summary)")
    for ax in (ax_eta, ax_g):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_eta.set_ylabel("eta")
    ax_g.set_ylabel("G")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


# ---- AGD against the best AdamW: the ratio table -----------------------------------------

@dataclass
class CellRatios:
    """One cell: per seed the best AdamW run (lowest final val loss over its learning rates),
    and per AGD label and seed that AGD run's final val loss divided by the best AdamW's."""
    cell: Cell
    best_adamw: dict[int, RunLog]  # seed -> run
    agd: dict[str, dict[int, RunLog]]  # label -> seed -> run

    @property
    def seeds(self) -> list[int]:
        return sorted(self.best_adamw)

    def ratio(self, label: str, seed: int) -> float | None:
        run = self.agd.get(label, {}).get(seed)
        return run.final_val_loss / self.best_adamw[seed].final_val_loss if run and seed in self.best_adamw else None

    def mean_ratio(self, label: str) -> float | None:
        ratios = [x for x in (self.ratio(label, s) for s in self.seeds) if x is not None]
        return statistics.mean(ratios) if ratios else None


def ratio_cells(runs: list[RunLog]) -> list[CellRatios]:
    """Cells holding both AGD and AdamW runs of a common seed; finished runs only (a killed or
    diverged run has no final loss to compare)."""
    by_cell: dict[Cell, list[RunLog]] = {}
    for r in runs:
        if r.done and r.final_val_loss is not None:
            by_cell.setdefault(r.cell, []).append(r)
    cells = []
    for cell in sorted(by_cell):
        best: dict[int, RunLog] = {}
        for r in (r for r in by_cell[cell] if r.optimiser == "adamw"):
            if r.seed not in best or r.final_val_loss < best[r.seed].final_val_loss:
                best[r.seed] = r
        agd: dict[str, dict[int, RunLog]] = {}
        for r in (r for r in by_cell[cell] if r.optimiser == "agd" and r.seed in best):
            agd.setdefault(r.agd_label, {})[r.seed] = r
        if agd:
            cells.append(CellRatios(cell, best, agd))
    return cells


def agd_labels(cells: list[CellRatios]) -> list[str]:
    labels = {label for c in cells for label in c.agd}
    return sorted(labels, key=lambda lab: (lab != "default", lab))  # the faithful default first


def ratio_text(cell: CellRatios, label: str) -> str:
    """`1.083 (1.080, 1.086)`: the mean over seeds, then each seed's ratio in seed order."""
    mean = cell.mean_ratio(label)
    if mean is None:
        return ""
    per_seed = [cell.ratio(label, s) for s in cell.seeds]
    if len(per_seed) == 1:
        return f"{mean:.3f} (seed {cell.seeds[0]} only)"
    return f"{mean:.3f} (" + ", ".join(f"{x:.3f}" if x is not None else "-" for x in per_seed) + ")"


def best_adamw_text(cell: CellRatios) -> str:
    return "; ".join(f"s{s}: {cell.best_adamw[s].final_val_loss:.4f} @ {short_number(cell.best_adamw[s].lr)}"
                     for s in cell.seeds)


def ratio_markdown(cells: list[CellRatios]) -> str:
    labels = agd_labels(cells)
    head = ["width", "layers", "batch", "tokenizer", "tokens", *(f"AGD {lab}" for lab in labels),
            "best AdamW (final val loss @ lr, per seed)"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---:"] * 3 + ["---"] + ["---:"] * (1 + len(labels)) + ["---"]) + "|"]
    for c in cells:
        cell = c.cell
        row = [str(cell.width), str(cell.depth), str(cell.batch), cell.tokenizer, fmt_count(cell.tokens),
               *(ratio_text(c, lab) for lab in labels), best_adamw_text(c)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratio_summary_markdown(cells: list[CellRatios]) -> str:
    """Per AGD setting over the whole grid: the (cell, seed) ratios' mean and worst, how many
    cells it ran in, in how many it is within 5% of the best AdamW (every seed), and in how
    many it beats the faithful `default` (every seed): the study's decision rule."""
    labels = agd_labels(cells)
    lines = ["| AGD | cells | mean ratio | worst ratio | within 5% of AdamW | beats default |",
             "|---|---:|---:|---:|---:|---:|"]
    for label in labels:
        ratios, ran, within, beats, compared = [], 0, 0, 0, 0
        for c in cells:
            mine = {s: r for s in c.seeds if (r := c.ratio(label, s)) is not None}
            if not mine:
                continue
            ran += 1
            ratios += mine.values()
            within += all(x <= 1.05 for x in mine.values())
            base = {s: c.ratio("default", s) for s in mine if c.ratio("default", s) is not None}
            if label != "default" and base:
                compared += 1
                beats += all(mine[s] < base[s] for s in base)
        lines.append(f"| {label} | {ran} | {statistics.mean(ratios):.3f} | {max(ratios):.3f} | {within}/{ran} | "
                     + (f"{beats}/{compared} |" if label != "default" else "- |"))
    return "\n".join(lines)


def write_ratio_csv(cells: list[CellRatios], path: Path) -> None:
    """One row per cell, AGD label and seed: the two runs and their ratio."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["n_embd", "n_layer", "tokenizer", "global_batch_size", "block_size", "tokens", "agd", "seed",
                    "agd_run", "agd_final_val_loss", "adamw_run", "adamw_lr", "adamw_final_val_loss", "ratio"])
        for c in cells:
            for label in agd_labels([c]):
                for seed, run in sorted(c.agd[label].items()):
                    adamw = c.best_adamw[seed]
                    w.writerow([c.cell.width, c.cell.depth, c.cell.tokenizer, c.cell.batch, c.cell.block_size,
                                c.cell.tokens, label, seed, run.name, run.final_val_loss, adamw.name, adamw.lr,
                                adamw.final_val_loss, c.ratio(label, seed)])


# ---- AGD diagnostics per role ---------------------------------------------------------

ROLE_METRICS = {  # metrics.jsonl prefix -> what it measures
    "agd_share": "share of G",
    "agd_rel_update": "update size ‖dW‖/‖W‖",
    "agd_weight_ratio": "weight growth ‖W‖/‖W0‖",
}


def role_series(run: RunLog, metric: str) -> dict[str, tuple[list[float], list[float]]]:
    """role -> (tokens, values) of `metric/<role>` over the run's train records (roles in log order)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    prefix = metric + "/"
    for record in run.trains():
        for key, value in record.items():
            if key.startswith(prefix) and _finite(value):
                tokens, values = series.setdefault(key[len(prefix):], ([], []))
                tokens.append(record["tokens"])
                values.append(value)
    return series


def representative_agd_runs(runs: list[RunLog]) -> dict[str, RunLog]:
    """One AGD run per label that logged per-role metrics: the widest (then deepest) cell, lowest seed."""
    chosen: dict[str, RunLog] = {}
    for r in runs:
        if r.optimiser != "agd" or not role_series(r, "agd_share"):
            continue
        key = (-r.width, -r.depth, r.seed, r.name)
        current = chosen.get(r.agd_label)
        if current is None or key < (-current.width, -current.depth, current.seed, current.name):
            chosen[r.agd_label] = r
    return dict(sorted(chosen.items(), key=lambda item: (item[0] != "default", item[0])))


def logged_role_metrics(chosen: dict[str, RunLog]) -> list[str]:
    """The per-role metrics some chosen run logged (older runs lack agd_weight_ratio)."""
    return [m for m in ROLE_METRICS if any(role_series(r, m) for r in chosen.values())]


def plot_agd_roles(runs: list[RunLog], path: Path) -> bool:
    chosen = representative_agd_runs(runs)
    if not chosen:
        return False
    metrics = logged_role_metrics(chosen)
    plt = _pyplot()
    roles = list(dict.fromkeys(role for r in chosen.values() for m in metrics for role in role_series(r, m)))
    cmap = plt.get_cmap("tab10" if len(roles) <= 10 else "tab20")
    colour = {role: cmap(i % cmap.N) for i, role in enumerate(roles)}
    fig, axes = plt.subplots(len(chosen), len(metrics), figsize=(4.6 * len(metrics), 3.4 * len(chosen)),
                             squeeze=False)
    for row, (label, run) in zip(axes, chosen.items()):
        for ax, metric in zip(row, metrics):
            for role, (tokens, values) in role_series(run, metric).items():
                ax.plot(tokens, values, color=colour[role], linewidth=1.3, label=role,
                        marker="." if len(values) < 30 else None)
            if metric == "agd_rel_update" and ax.lines:
                ax.set_yscale("log")  # update sizes span decades across roles
            ax.set_title(f"AGD {label}: {ROLE_METRICS[metric]}\n{run.name}", fontsize=8)
            ax.set_xlabel("tokens seen")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
            else:
                ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


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


# ---- the report -----------------------------------------------------------------------

PLOTS = {
    "val_loss_vs_tokens.png": (plot_val_loss, "Validation loss against tokens seen"),
    "lr_transfer.png": (plot_lr_transfer, "Final validation loss against AdamW's learning rate (AGD: dashed)"),
    "agd_eta.png": (plot_agd_eta, "AGD's step size eta and G over steps"),
    "agd_roles.png": (plot_agd_roles, "AGD diagnostics per role: share of G, update size, weight growth"),
}

RATIO_NOTE = (
    "Each value: AGD's final val loss divided by the best AdamW's (lowest final val loss over its learning "
    "rates) of the same cell and seed, averaged over seeds, then each seed's ratio in seed order. Below 1: "
    "AGD is better. A cell is width, layers, batch (sequences per step), tokenizer, block size and planned "
    "tokens; finished runs only.")
ROLES_NOTE = (
    "One AGD run per setting (the widest cell, lowest seed); final logged values. share of G: the role's part "
    "of AGD's gradient summary G. update size: ‖dW‖_F / ‖W‖_F of the last step. weight growth: "
    "‖W‖_F / ‖W0‖_F (not logged by older runs).")


def write_outputs(runs: list[RunLog], out: Path) -> dict:
    """Every file of the report folder but report.md; what report.md needs to embed them."""
    out.mkdir(parents=True, exist_ok=True)
    plots = [name for name, (fn, _) in PLOTS.items() if fn(runs, out / name)]
    write_csv(runs, out / "runs.csv")
    cells = ratio_cells(runs)
    if cells:
        write_ratio_csv(cells, out / "agd_vs_adamw.csv")
    roles = role_final_rows(runs)
    if roles:
        write_role_csv(roles, out / "agd_roles.csv")
    return {"plots": plots, "ratio_table": ratio_markdown(cells) if cells else None,
            "ratio_summary": ratio_summary_markdown(cells) if cells else None,
            "roles_table": role_markdown(roles) if roles else None}


def report_lines(runs: list[RunLog], paths: list, title: str, table: str, written: dict, warnings: list[str]) -> list[str]:
    unfinished = [r.name for r in runs if not r.done]
    lines = [f"# {title}", "",
             f"{len(runs)} run(s) from {', '.join(f'`{p}`' for p in paths)}; written by `agdlm report` "
             "from each run's config.yaml and metrics.jsonl.", "",
             table, "",
             "lr: AdamW's peak learning rate (AGD has none). params: all parameters, tied weights once. "
             "tokens: tokens seen at the last record. tokens/s: median over logged intervals."]
    if unfinished:
        lines += ["", f"\\* not finished (no DONE marker): {', '.join(unfinished)}."]
    if warnings:
        lines += ["", "Skipped or partly read:", ""] + [f"- {w}" for w in warnings]
    downstream = downstream_markdown(runs)
    if downstream:
        lines += ["", "## Downstream evaluation (`agdlm eval`)", "", downstream, "",
                  "eval loss: held-out loss on that source, cut as training cuts it; acc_norm: multiple-choice "
                  "accuracy by loss per token (HellaSwag format). From each run's eval.json."]
    if written["ratio_table"]:
        lines += ["", "## AGD against the best-tuned AdamW (final val loss ratio)", "", written["ratio_table"], "",
                  RATIO_NOTE + " Per seed: agd_vs_adamw.csv.", "",
                  "Across the grid: mean and worst over every (cell, seed) ratio; within 5%: cells where every "
                  "seed's ratio is at most 1.05; beats default: cells where every seed's ratio is below the "
                  "faithful `default` AGD's of the same seed.", "", written["ratio_summary"]]
    for name in written["plots"]:
        lines += ["", f"## {PLOTS[name][1]}", "", f"![{PLOTS[name][1]}]({name})"]
        if name == "agd_roles.png" and written["roles_table"]:
            lines += ["", written["roles_table"], "", ROLES_NOTE]
    missing = [PLOTS[n][1] for n in PLOTS if n not in written["plots"]]
    if missing:
        lines += ["", "Not drawn (no data for them in these runs): " + "; ".join(missing) + "."]
    return lines


def build_report(paths: list[str | Path], out: str | Path, title: str | None = None) -> dict:
    """Write the report folder; returns {"runs", "table", "ratio_table", "roles_table", "plots",
    "report", "warnings"}. A run that cannot be read is left out with a warning; none readable
    is NoRuns."""
    runs, warnings = read_runs(paths)
    if not runs:
        found = f" ({'; '.join(warnings)})" if warnings else ""
        raise NoRuns(f"no readable runs (folders with metrics.jsonl) in {', '.join(map(str, paths))}{found}")
    out = Path(out)
    written = write_outputs(runs, out)
    table = markdown_table(table_rows(runs))
    groups = sorted({str(r.config.get("log", {}).get("group")) for r in runs if r.config.get("log", {}).get("group")})
    title = title or f"agdlm report: {', '.join(groups) if groups else ', '.join(str(p) for p in paths)}"
    report = out / "report.md"
    report.write_text("\n".join(report_lines(runs, paths, title, table, written, warnings)) + "\n")
    return {"runs": runs, "table": table, "ratio_table": written["ratio_table"],
            "ratio_summary": written["ratio_summary"], "roles_table": written["roles_table"],
            "plots": [out / p for p in written["plots"]], "report": report, "warnings": warnings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agdlm report", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_SWEEP_DIR")
    p.add_argument("-o", "--out", help="report folder (default: <sweep dir>/report for one folder, else ./report)")
    p.add_argument("--title", help="the report's heading")
    p.add_argument("--wandb", choices=("off", "offline", "online"), default="off",
                   help="also log the comparison as one W&B run (tables, line plots, the plots as images)")
    p.add_argument("--project", help="W&B project (default: the runs' log.project)")
    p.add_argument("--entity", help="W&B entity (default: the runs' log.entity)")
    p.add_argument("--group", help="W&B group (default: the runs' log.group)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.out or (str(Path(args.paths[0]) / "report") if len(args.paths) == 1 and not
                       (Path(args.paths[0]) / "metrics.jsonl").is_file() else "report")
    try:
        result = build_report(args.paths, out, args.title)
    except NoRuns as e:
        print(f"agdlm report: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder: absent parent that cannot be made, a file, no permission
        print(f"agdlm report: cannot write the report to {out}: {e.strerror or e} ({e.filename or out})", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"agdlm report: warning: {warning}", file=sys.stderr)
    print(result["table"])
    if result["ratio_table"]:
        print("\nAGD final val loss / best AdamW's (same cell and seed; mean (per seed)):")
        print(result["ratio_table"])
        print("\nAcross the grid:")
        print(result["ratio_summary"])
    print(f"\nwrote {result['report']} with {len(result['plots'])} plot(s): "
          + ", ".join(str(p) for p in result["plots"]))
    if args.wandb != "off":
        from agdlm.report_wandb import log_report

        title = result["report"].read_text().splitlines()[0].lstrip("# ")
        local = log_report(result, Path(out), args.wandb, title, args.project, args.entity, args.group)
        print(f"logged the comparison to W&B ({args.wandb}): {local}")
    return 0
