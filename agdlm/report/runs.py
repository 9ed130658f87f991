"""Reading run folders: config.yaml, metrics.jsonl, DONE or DIVERGED, and the optional eval.json and
timing.json. A folder that holds metrics.jsonl is a run; any other folder is searched (one
level) for runs. Everything the report knows about a run is read from these files, never from
folder names."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from agdlm.eval_results import headline_values, read_results
from agdlm.report.optimisers import LR_SWEPT, agd_label, family_rank, setting_label
from agdlm.report.shapes import count_params

TIMING_FILE = "timing.json"  # {"idle": false, "note": "..."}: the run shared its machine


@dataclass(frozen=True, order=True)
class Cell:
    """One experiment of a study grid: runs in a cell differ only in optimiser settings and seed."""
    width: int
    depth: int
    tokenizer: str
    batch: int  # sequences per optimiser step (train.global_batch_size)
    block_size: int
    tokens: int  # planned: train.max_tokens, or max_steps x batch x block_size

    @property
    def label(self) -> str:
        return f"w{self.width} L{self.depth} · b{self.batch} · {self.tokenizer} · {fmt_count(self.tokens)} tok"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.depth, self.width)

    @property
    def group(self) -> tuple:
        """Everything but the model's shape: cells of one group differ in depth and width only."""
        return (self.tokenizer, self.batch, self.block_size, self.tokens)


def group_label(group: tuple) -> str:
    tokenizer, batch, block, tokens = group
    return f"{tokenizer} · batch {batch} · block {block} · {fmt_count(tokens)} tokens"


def fmt_count(n: float | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


@dataclass
class RunLog:
    name: str
    path: Path
    config: dict
    records: list[dict] = field(default_factory=list)
    done: bool = False
    malformed_lines: list[int] = field(default_factory=list)  # metrics.jsonl lines skipped (1-based)
    downstream: dict[str, float] = field(default_factory=dict)  # eval.json's headline values (`agdlm eval`)
    timing: dict = field(default_factory=dict)  # timing.json, {} when absent
    stopped_diverging: bool = False  # DIVERGED: the trainer stopped it (a non-finite loss, AGD's skip limit)

    @property
    def optim(self) -> dict:
        return self.config.get("optim", {})

    @property
    def optimiser(self) -> str:
        return self.optim.get("name", "?")

    @property
    def lr(self) -> float | None:
        """The swept learning rate (None for the learning-rate-free optimisers)."""
        return float(self.optim["lr"]) if self.optimiser in LR_SWEPT else None

    @property
    def setting(self) -> str:
        return setting_label(self.optim)

    @property
    def agd_label(self) -> str | None:
        return agd_label(self.optim) if self.optimiser == "agd" else None

    @property
    def gain(self) -> float:
        return float(self.optim.get("gain", 1.0)) if self.optimiser == "agd" else 1.0

    @property
    def base_setting(self) -> str:
        """The setting at gain 1: what a gain-sensitivity run varies."""
        return setting_label({**self.optim, "gain": 1.0})

    @property
    def sensitivity(self) -> bool:
        """AGD at a gain other than 1: the sensitivity curve, never a setting to pick."""
        return self.gain != 1.0

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
    def cell(self) -> Cell:
        """Everything that defines the experiment except the optimiser's settings and the seed."""
        model, data, train = (self.config.get(k, {}) for k in ("model", "data", "train"))
        batch, block = int(train.get("global_batch_size", 0)), int(model.get("block_size", 0))
        max_tokens = train.get("max_tokens")
        planned = int(max_tokens) if max_tokens is not None else int(train.get("max_steps", 0)) * batch * block
        return Cell(self.width, self.depth, str(data.get("tokenizer", "gpt2")), batch, block, planned)

    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "eval" and finite(r.get("val_loss"))]

    def trains(self) -> list[dict]:
        return [r for r in self.records if r.get("kind") == "train"]

    @property
    def diverged(self) -> bool:
        """The trainer stopped it for a non-finite loss or AGD's skip limit (DIVERGED), or its last
        eval is not a number: the run blew up (its earlier evals say nothing final)."""
        evals = [r for r in self.records if r.get("kind") == "eval" and "val_loss" in r]
        return self.stopped_diverging or (bool(evals) and not finite(evals[-1]["val_loss"]))

    @property
    def ended(self) -> bool:
        """DONE, or stopped by the trainer for divergence: either way no longer running."""
        return self.done or self.stopped_diverging

    @property
    def usable(self) -> bool:
        """Finished with a final loss: the runs every comparison is made of."""
        return self.done and not self.diverged and self.final_val_loss is not None

    @property
    def status(self) -> str:
        if self.diverged:
            return "diverged"
        if not self.done:
            return "not finished"
        return "finished" if self.final_val_loss is not None else "no eval"

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
        rates = [r["tokens_per_s"] for r in self.trains() if finite(r.get("tokens_per_s"))]
        return statistics.median(rates) if rates else None

    @property
    def seconds_per_token(self) -> float | None:
        """Median over train records of 1/tokens_per_s, or step_time_s / tokens per step where a
        record has no rate."""
        per_step = self.cell.batch * self.cell.block_size
        values = []
        for r in self.trains():
            if finite(r.get("tokens_per_s")) and r["tokens_per_s"] > 0:
                values.append(1.0 / r["tokens_per_s"])
            elif finite(r.get("step_time_s")) and per_step > 0:
                values.append(r["step_time_s"] / per_step)
        return statistics.median(values) if values else None

    @property
    def timed_idle(self) -> bool:
        """False when timing.json says the run shared its machine: its timings are marked."""
        return self.timing.get("idle", True) is not False

    @property
    def params(self) -> int | None:
        return count_params(self.config.get("model", {}))


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    if not (finite(record.get("step")) and finite(record.get("tokens"))):
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


def read_timing(path: Path) -> dict:
    """timing.json ({} when absent): {"idle": false, "note": why} marks the run's timings."""
    file = path / TIMING_FILE
    if not file.is_file():
        return {}
    try:
        timing = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadRun(f"{file}: unreadable ({first_line(e)})") from None
    if not isinstance(timing, dict) or not isinstance(timing.get("idle", True), bool):
        raise BadRun(f'{file}: not {{"idle": true|false, "note": "..."}}')
    return timing


def read_run(path: Path) -> RunLog:
    """A run folder as a RunLog; BadRun (one line naming the file) when it cannot be read."""
    path = Path(path)
    config = read_config(path)
    records, malformed = read_metrics(path)
    name = str(config.get("train", {}).get("run_name") or path.name)
    run = RunLog(name, path, config, records, (path / "DONE").is_file(), malformed,
                 headline_values(read_results(path)), read_timing(path), (path / "DIVERGED").is_file())
    try:  # every config value the report reads, read once here, so a bad one names its file
        sort_key(run), run.cell, run.setting, run.gain
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
    return (run.depth, run.width, family_rank(run.optimiser), run.lr or 0.0, run.seed, run.name)
