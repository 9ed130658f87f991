"""Compare runs from their own logs (no W&B needed): `agdlm report RUN_DIRS_OR_SWEEP_DIRS [-o OUT]`.

Reads each run's config.yaml and metrics.jsonl and writes a self-contained folder:

    report.md                 the table below, with the plots embedded
    runs.csv                  the same table, for spreadsheets
    val_loss_vs_tokens.png    validation loss against tokens seen, one panel per optimiser
    lr_transfer.png           final val loss against AdamW's learning rate, one line per width,
                              AGD (no learning rate) as a horizontal line in the width's colour
    agd_eta.png               AGD's step size eta and G over steps

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

from agdlm.sweep import short_number

DPI = 90
OPTIMISER_LABEL = {"agd": "AGD", "adamw": "AdamW"}
LINESTYLES = ["-", "--", "-.", ":", (0, (3, 1, 1, 1, 1, 1)), (0, (5, 2)), (0, (1, 2))]


@dataclass
class RunLog:
    name: str
    path: Path
    config: dict
    records: list[dict] = field(default_factory=list)
    done: bool = False
    malformed_lines: list[int] = field(default_factory=list)  # metrics.jsonl lines skipped (1-based)

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
    run = RunLog(name, path, config, records, (path / "DONE").is_file(), malformed)
    try:  # every config value the report reads, read once here, so a bad one names its file
        sort_key(run)
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
            "optimiser": OPTIMISER_LABEL.get(r.optimiser, r.optimiser),
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


def write_csv(runs: list[RunLog], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "finished", "optimiser", "lr", "n_layer", "n_embd", "seed", "params", "tokens",
                    "final_val_loss", "best_val_loss", "tokens_per_s", "run_dir"])
        for r in runs:
            w.writerow([r.name, r.done, r.optimiser, r.lr if r.lr is not None else "", r.depth, r.width, r.seed,
                        r.params or "", r.tokens, r.final_val_loss, r.best_val_loss, r.tokens_per_s, str(r.path)])


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
    fig, axes = plt.subplots(1, len(optimisers), figsize=(5.2 * len(optimisers), 4.2), sharey=True, squeeze=False)
    for ax, opt in zip(axes[0], optimisers):
        for r in (r for r in plotted if r.optimiser == opt):
            ev = r.evals()
            style = LINESTYLES[lrs.index(r.lr) % len(LINESTYLES)] if r.lr is not None else "-"
            label = size_label(r, plotted) + (f", lr {short_number(r.lr)}" if r.lr is not None else "") + (
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


# ---- the report -----------------------------------------------------------------------

PLOTS = {
    "val_loss_vs_tokens.png": (plot_val_loss, "Validation loss against tokens seen"),
    "lr_transfer.png": (plot_lr_transfer, "Final validation loss against AdamW's learning rate (AGD: dashed)"),
    "agd_eta.png": (plot_agd_eta, "AGD's step size eta and G over steps"),
}


def build_report(paths: list[str | Path], out: str | Path, title: str | None = None) -> dict:
    """Write the report folder; returns {"runs", "table", "plots", "report", "warnings"}.
    A run that cannot be read is left out with a warning; none readable is NoRuns."""
    runs, warnings = read_runs(paths)
    if not runs:
        found = f" ({'; '.join(warnings)})" if warnings else ""
        raise NoRuns(f"no readable runs (folders with metrics.jsonl) in {', '.join(map(str, paths))}{found}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [name for name, (fn, _) in PLOTS.items() if fn(runs, out / name)]
    table = markdown_table(table_rows(runs))
    write_csv(runs, out / "runs.csv")

    groups = sorted({str(r.config.get("log", {}).get("group")) for r in runs if r.config.get("log", {}).get("group")})
    title = title or f"agdlm report: {', '.join(groups) if groups else ', '.join(str(p) for p in paths)}"
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
    for name in plots:
        lines += ["", f"## {PLOTS[name][1]}", "", f"![{PLOTS[name][1]}]({name})"]
    missing = [PLOTS[n][1] for n in PLOTS if n not in plots]
    if missing:
        lines += ["", "Not drawn (no data for them in these runs): " + "; ".join(missing) + "."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return {"runs": runs, "table": table, "plots": [out / p for p in plots], "report": report, "warnings": warnings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agdlm report", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_SWEEP_DIR")
    p.add_argument("-o", "--out", help="report folder (default: <sweep dir>/report for one folder, else ./report)")
    p.add_argument("--title", help="the report's heading")
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
    print(f"\nwrote {result['report']} with {len(result['plots'])} plot(s): "
          + ", ".join(str(p) for p in result["plots"]))
    return 0
