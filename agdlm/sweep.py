"""Scaling runs: expand a sweep file into named runs; run them here one after another,
print their torchrun commands, or write a Slurm array script.

    agdlm sweep configs/sweeps/width-ladder.yaml                 # run locally, skip finished
    agdlm sweep width-ladder --emit torchrun --nproc-per-node 8  # print one command per run
    agdlm sweep width-ladder --emit slurm -o ladder.sbatch       # one array task per run
    agdlm sweep width-ladder --list                              # names and overrides only

A sweep file:

    name: width-ladder                  # the W&B group and the folder under train.out_dir
    configs: [tiny.yaml]                # base config files, merged in order
    set: {train.max_steps: 2000}        # overrides for every run
    axes:                               # run names join one variant name per axis, in order
      width:                            # an axis is a list of variants ...
        - {name: w128, set: {model.n_embd: 128, model.n_head: 2}}
        - {name: w256, set: {model.n_embd: 256, model.n_head: 4}}
      optim:
        - {name: agd, set: {optim.name: agd}}
        - name: adamw-lr{optim.lr}      # {key} is replaced by that key's value in this variant
          set: {optim.name: adamw}
          grid: {optim.lr: [1e-3, 3e-3]}  # ... and a variant with a grid is one variant per point
      seed: {key: train.seed, values: [0, 1], name: "s{value}"}  # ... or one key's values

gives w128-agd-s0, w128-adamw-lr1e-3-s0, ... : AGD once per width and seed, AdamW once per
learning rate. Every run gets train.run_name = its name, train.out_dir = <out_dir>/<sweep
name>, log.group = the sweep name and log.tags = one `axis=variant` tag per axis. Extra
`section.key=value` arguments apply to every run (after `set`, before the axes). A run whose
folder holds DONE is finished and skipped; so is one that holds DIVERGED (it stopped on a
non-finite loss or AGD's skip limit: a result, and running it again would repeat it).

Every value written into a printed command or an emitted script is quoted for the line it
lands on (bash for commands, Slurm's own rules for #SBATCH lines); a value an #SBATCH line
cannot hold (a newline, any control character) is refused with one line naming its key.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agdlm import slurm_requeue
from agdlm.config import SECTIONS, Config, ConfigError, load_config, parse_override, read_yaml_mapping, resolve_config_path

RUN_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass
class Run:
    name: str
    configs: list[str]  # base config files (shipped names or absolute paths)
    overrides: list[str]  # section.key=value, in the order they apply
    axes: dict[str, str] = field(default_factory=dict)  # axis -> variant name
    run_dir: Path = Path(".")
    varied: list[str] = field(default_factory=list)  # the overrides its axis variants set

    def train_args(self) -> list[str]:
        """The arguments of `agdlm train` that make this run."""
        return [*self.configs, *self.overrides]

    def config(self) -> Config:
        return load_config(self.configs, self.overrides)

    @property
    def state(self) -> str:
        """done, diverged (a result too: not run again) or todo."""
        if (self.run_dir / "DONE").is_file():
            return "done"
        return "diverged" if (self.run_dir / "DIVERGED").is_file() else "todo"

    @property
    def finished(self) -> bool:
        return self.state != "todo"


@dataclass
class Sweep:
    name: str
    path: Path
    runs: list[Run]
    out_dir: Path  # the sweep's folder: every run dir is <out_dir>/<run name>
    common: list[str] = field(default_factory=list)  # overrides every run shares
    out_dir_key: str = "train.out_dir"  # where out_dir came from, for error messages


# ---- reading a sweep file -------------------------------------------------------------

def find_sweep_file(name: str | Path) -> Path:
    """A path, or a sweep shipped in configs/sweeps/ (with or without folder and .yaml)."""
    name = str(name)
    here = Path(name)
    if here.is_file():
        return here
    stem = name.removeprefix("configs/").removeprefix("sweeps/")
    for root in (Path(__file__).resolve().parent.parent / "configs", None):
        for candidate in (f"sweeps/{stem}", f"sweeps/{stem}.yaml"):
            try:
                path = (root / candidate) if root else resolve_config_path(candidate)
            except ConfigError:
                continue
            if path.is_file():
                return path
    raise ConfigError(f"sweep file not found: {name} (looked in the working directory and configs/sweeps/)")


def flatten_overrides(where: str, mapping: Any) -> dict[str, Any]:
    """{section.key: value} from either {"model.n_embd": 128} or {"model": {"n_embd": 128}}."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of section.key: value, got {mapping!r}")
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        key = str(key)
        if "." not in key and isinstance(value, dict):
            for inner, v in value.items():
                flat[f"{key}.{inner}"] = v
        else:
            flat[key] = value
    for key in flat:
        if key.count(".") != 1 or key.split(".")[0] not in SECTIONS:
            raise ConfigError(f"{where}: {key!r} is not section.key (sections: {', '.join(SECTIONS)})")
    return flat


def format_value(value: Any) -> str:
    """A value as it reads back through `section.key=value` (YAML), short and exact."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return short_number(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain and value.strip() == value and value else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return json.dumps([v for v in value])
    raise ConfigError(f"cannot write {value!r} as an override value")


def short_number(value: float) -> str:
    """3e-3 for 0.003, 1e-2, 2.5e-3, 0.5, 2000: the shortest exact-enough form."""
    if value == 0 or (0.1 <= abs(value) < 1e5):
        text = f"{value:.6g}"
        return text if "e" not in text else short_number_sci(value)
    return short_number_sci(value)


def short_number_sci(value: float) -> str:
    mantissa, exponent = f"{value:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def name_label(value: Any) -> str:
    if isinstance(value, float):
        return short_number(value)
    if isinstance(value, (list, tuple)):
        return "_".join(name_label(v) for v in value)
    return str(value)


def fill_name(template: str, values: dict[str, Any], where: str) -> str:
    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise ConfigError(f"{where}: name {template!r} refers to {{{key}}}, which this variant does not set")
        return name_label(values[key])

    return PLACEHOLDER.sub(sub, str(template))


def expand_axis(axis: str, spec: Any) -> list[tuple[str, dict[str, Any]]]:
    """The variants of one axis as (name, {section.key: value})."""
    where = f"axes.{axis}"
    if isinstance(spec, dict):  # one key's values
        if "key" not in spec or "values" not in spec:
            raise ConfigError(f"{where}: a mapping axis needs `key` and `values` (or give a list of variants)")
        template = spec.get("name", f"{axis}{{value}}")
        extra = flatten_overrides(f"{where}.set", spec.get("set"))
        flatten_overrides(where, {spec["key"]: None})  # check the key
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{where}.values: expected a non-empty list of values for {spec['key']}, "
                              f"got {spec['values']!r}")
        return [
            (fill_name(template, {"value": v, spec["key"]: v, **extra}, where), {**extra, spec["key"]: v})
            for v in spec["values"]
        ]
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{where}: expected a non-empty list of variants or a {{key, values}} mapping")
    variants = []
    for i, variant in enumerate(spec):
        vwhere = f"{where}[{i}]"
        if not isinstance(variant, dict) or "name" not in variant:
            raise ConfigError(f"{vwhere}: a variant is a mapping with a `name` (and `set`, `grid`)")
        unknown = set(variant) - {"name", "set", "grid"}
        if unknown:
            raise ConfigError(f"{vwhere}: unknown field(s) {sorted(unknown)} (allowed: name, set, grid)")
        base = flatten_overrides(f"{vwhere}.set", variant.get("set"))
        grid = flatten_overrides(f"{vwhere}.grid", variant.get("grid"))
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{vwhere}.grid.{key}: expected a non-empty list of values")
        for point in itertools.product(*grid.values()) if grid else [()]:
            values = {**base, **dict(zip(grid, point))}
            variants.append((fill_name(variant["name"], values, vwhere), values))
    return variants


def load_sweep(path: str | Path, extra_overrides: list[str] | None = None, out_dir: str | Path | None = None) -> Sweep:
    path = find_sweep_file(path)
    raw = read_yaml_mapping(path, expected="a mapping with name, configs, set, axes")
    unknown = set(raw) - {"name", "configs", "set", "axes", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {sorted(unknown)} (allowed: name, description, configs, set, axes)")
    name = str(raw.get("name") or path.stem)
    if not RUN_NAME_OK.match(name):
        raise ConfigError(f"{path}: sweep name {name!r} must be letters, digits and . _ = + - only")

    configs = raw.get("configs") or []
    configs = [configs] if isinstance(configs, str) else configs
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise ConfigError(f"{path}: configs: expected a config file name or a list of them, got {configs!r}")
    resolved_configs = []
    for c in configs:
        found = resolve_config_path(c, path.parent)
        # keep shipped names as written (portable to a cluster checkout); pin local files
        shipped = not Path(c).is_file() and not (path.parent / c).is_file()
        resolved_configs.append(str(c) if shipped else str(found.resolve()))

    common = [f"{k}={format_value(v)}" for k, v in flatten_overrides(f"{path}: set", raw.get("set")).items()]
    common += list(extra_overrides or [])
    for arg in extra_overrides or []:
        parse_override(arg)  # fail early on a malformed one

    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{path}: axes must be a mapping of axis name -> variants")
    expanded = [(axis, expand_axis(axis, spec)) for axis, spec in axes.items()]

    base_cfg = load_config(resolved_configs or None, common)  # checks the shared part once
    root = Path(out_dir) if out_dir is not None else Path(base_cfg.train.out_dir)
    sweep_dir = root / name
    runs, seen = [], {}
    for combo in itertools.product(*(variants for _, variants in expanded)) if expanded else [()]:
        run_name = "-".join(vname for vname, _ in combo) or name
        axis_names = {axis: vname for (axis, _), (vname, _) in zip(expanded, combo)}
        if not RUN_NAME_OK.match(run_name):
            raise ConfigError(f"{path}: run name {run_name!r} must be letters, digits and . _ = + - only")
        if run_name in seen:
            raise ConfigError(f"{path}: two runs are both named {run_name!r} ({seen[run_name]} and {axis_names}); "
                              "give their variants different names")
        seen[run_name] = axis_names
        varied = [f"{k}={format_value(v)}" for _, values in combo for k, v in values.items()]
        overrides = common + varied
        tags = list(base_cfg.log.tags) + [f"{axis}={vname}" for axis, vname in axis_names.items()]
        overrides += [
            f"train.run_name={run_name}",
            f"train.out_dir={format_value(str(sweep_dir))}",
            f"log.group={format_value(name)}",
            f"log.tags={format_value(tags)}",
        ]
        runs.append(Run(run_name, resolved_configs, overrides, axis_names, sweep_dir / run_name, varied))
    sweep = Sweep(name, path, runs, sweep_dir, common, "--out-dir" if out_dir is not None else "train.out_dir")
    for run in runs:  # every run's config must be valid before anything starts
        try:
            run.config()
        except ConfigError as e:
            raise ConfigError(f"{path}: run {run.name}: {e}") from None
    return sweep


# ---- emitting -------------------------------------------------------------------------

def train_command(run: Run, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "agdlm", "train", *run.train_args()]


def torchrun_command(run: Run, nproc_per_node: int | str = 1, nnodes: int | str = 1, rdzv: str | None = None) -> list[str]:
    cmd = ["torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}"]
    if rdzv:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv}"]
    elif str(nnodes) == "1":
        cmd += ["--standalone"]
    return cmd + ["-m", "agdlm", "train", *run.train_args()]


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


class ShellText(str):
    """Shell text written into a script as it is (a `$VAR` the script expands), not quoted."""


def script_line(words: list[str]) -> str:
    """Words for bash: every value quoted, ShellText as written (it is ours, never a user's)."""
    return " ".join(w if isinstance(w, ShellText) else shlex.quote(w) for w in words)


# Slurm reads `#SBATCH` lines with its own rules, not bash's: double quotes group, a backslash
# escapes the next character, an unescaped `#` ends the line, single quotes are literal. A line
# ends at a newline, so a value holding one (or any control character) cannot be written.
SLURM_BARE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def slurm_directive_value(key: str, value: str) -> str:
    """`value` as (part of) one argument of an #SBATCH line; ConfigError naming `key` if it cannot be."""
    bad = sorted({c for c in value if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ConfigError(f"{key}: {value!r} cannot be written into an #SBATCH line (it holds "
                          f"{', '.join(repr(c) for c in bad)}); choose a value without it")
    if SLURM_BARE.match(value):
        return value
    return '"' + re.sub(r'([\\"#])', r"\\\1", value) + '"'


def comment_text(value: str) -> str:
    """A value shown in a `#` comment: control characters escaped so the comment stays one line."""
    return "".join(c if 32 <= ord(c) != 127 else repr(c)[1:-1] for c in value)


def slurm_directives(sweep: Sweep, runs: list[Run], *, gpus_per_node: int, nodes: int, time: str,
                     cpus_per_task: int | None, max_parallel: int | None, sbatch: list[str]) -> list[str]:
    array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    options = [  # (the key a value comes from, the option, the value)
        ("sweep name", "--job-name=", sweep.name),
        ("--max-parallel", "--array=", array),
        ("--nnodes", "--nodes=", str(nodes)),
        ("", "--ntasks-per-node=", "1"),
        ("--nproc-per-node", "--gpus-per-node=", str(gpus_per_node)),
        ("--time", "--time=", time),
        (sweep.out_dir_key, "--output=", f"{sweep.out_dir / 'slurm'}/%x-%A_%a.out"),
    ]
    if cpus_per_task:
        options.append(("--cpus-per-task", "--cpus-per-task=", str(cpus_per_task)))
    lines = [f"#SBATCH {option}{slurm_directive_value(key, value)}" for key, option, value in options]
    for opt in sbatch:  # the operator's words, e.g. `--partition gpu`: each quoted for Slurm
        slurm_directive_value("--sbatch", opt)  # shlex.split would take a newline for a space
        try:
            words = shlex.split(opt)
        except ValueError as e:
            raise ConfigError(f"--sbatch {opt!r}: {e}") from None
        lines.append("#SBATCH " + " ".join(slurm_directive_value("--sbatch", w) for w in words))
    return lines


def srun_line(run: Run, gpus_per_node: int) -> str:
    """The array task's command: torchrun across the allocation, rendezvous on its first node."""
    words = ["srun", "torchrun", ShellText('--nnodes="$SLURM_NNODES"'), f"--nproc_per_node={gpus_per_node}",
             "--rdzv_backend=c10d", ShellText('--rdzv_endpoint="$head_node:$MASTER_PORT"'),
             "-m", "agdlm", "train", *run.train_args()]
    return script_line(words)


def slurm_script(sweep: Sweep, runs: list[Run], *, gpus_per_node: int = 1, nodes: int = 1, time: str = "24:00:00",
                 cpus_per_task: int | None = None, max_parallel: int | None = None,
                 sbatch: list[str] | None = None, setup: str | None = None,
                 signal: str = slurm_requeue.DEFAULT_SIGNAL) -> str:
    """A Slurm array script: task i runs runs[i]. One node per task; with several nodes the
    rendezvous is the first node of the allocation. `signal` (SIGNAL@SECONDS) comes that long
    before the time limit: the run checkpoints and the task is requeued (agdlm.slurm_requeue).
    Every value is quoted for the line it is on; `setup` is the operator's own shell code and is
    written as given. Raises ConfigError (naming the key) for a value an #SBATCH line cannot hold."""
    signal_name, lead_seconds = slurm_requeue.parse_signal(signal)
    lines = ["#!/bin/bash"]
    lines += slurm_directives(sweep, runs, gpus_per_node=gpus_per_node, nodes=nodes, time=time,
                              cpus_per_task=cpus_per_task, max_parallel=max_parallel, sbatch=sbatch or [])
    lines += slurm_requeue.sbatch_lines(signal_name, lead_seconds)
    lines += [
        f"# agdlm sweep {comment_text(str(sweep.path))}: {len(runs)} run(s); a run whose folder holds DONE exits at once.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}  # where `agdlm sweep` ran: relative paths start here",
    ]
    if setup:
        lines.append(setup)
    lines += [
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((29500 + SLURM_ARRAY_TASK_ID % 1000))",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, run in enumerate(runs):
        lines.append(f"  {i}) # {comment_text(run.name)}")
        lines.append(f"    task=({srun_line(run, gpus_per_node)}) ;;")
    lines += [
        '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
        "esac",
    ]
    lines += slurm_requeue.trap_lines(signal_name, lead_seconds)
    lines += slurm_requeue.run_lines()
    return "\n".join(lines + [""])


def run_locally(sweep: Sweep, runs: list[Run], python: str | None = None) -> list[tuple[str, int]]:
    """Each run in its own process (a clean interpreter per run), one after another. A run
    that fails is reported and the sweep goes on. Each run's folder gets timing.json: whether
    the machine was otherwise idle while it ran (agdlm.load_watch), for its speed figures."""
    from agdlm.load_watch import LoadWatch

    results = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name}: {shell_line(train_command(run, python))}", flush=True)
        with LoadWatch() as watch:
            rc = subprocess.run(train_command(run, python)).returncode
        run_dir = Path(run.config().train.out_dir) / run.name
        if run_dir.is_dir():
            watch.write(run_dir / "timing.json")
        results.append((run.name, rc))
        if rc != 0:
            what = "diverged (DIVERGED written)" if run.state == "diverged" else "failed"
            print(f"[{i}/{len(runs)}] {run.name} {what} (exit {rc}); going on", file=sys.stderr, flush=True)
    return results


# ---- command line ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agdlm sweep",
        description="Expand a sweep file (configs/sweeps/*.yaml) into named runs and run them "
        "or print how to launch them. Runs whose folder holds DONE are skipped.",
        epilog=__doc__.split("A sweep file:")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sweep", help="a sweep file, or the name of one in configs/sweeps/")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run")
    p.add_argument("--emit", choices=("local", "torchrun", "slurm"), default="local",
                   help="local: run here one after another (default); torchrun: print commands; slurm: write an array script")
    p.add_argument("--list", action="store_true", help="print the runs (name, state, overrides) and exit")
    p.add_argument("--out-dir", help="root for the sweep folder (default: train.out_dir of the base config)")
    p.add_argument("--only", help="a regular expression; only runs whose name matches")
    p.add_argument("--all", action="store_true", help="include finished runs in --emit torchrun/slurm output")
    p.add_argument("-o", "--output", help="--emit slurm: where to write the script (default: <sweep dir>/sweep.sbatch)")
    p.add_argument("--nproc-per-node", default=1, help="torchrun/slurm: processes (GPUs) per node (default 1)")
    p.add_argument("--nnodes", default=1, help="torchrun: nodes per run (default 1); slurm: --nodes")
    p.add_argument("--rdzv-endpoint", help="torchrun with several nodes: host:port of the rendezvous")
    p.add_argument("--time", default="24:00:00", help="slurm: time limit per run")
    p.add_argument("--cpus-per-task", type=int, help="slurm: CPUs per task")
    p.add_argument("--max-parallel", type=int, help="slurm: at most this many array tasks at once")
    p.add_argument("--sbatch", action="append", default=[], help="slurm: an extra #SBATCH option, e.g. --partition=gpu")
    p.add_argument("--setup", help="slurm: a shell line run before the training command (e.g. module load, venv)")
    p.add_argument("--signal", default=slurm_requeue.DEFAULT_SIGNAL,
                   help="slurm: SIGNAL@SECONDS Slurm sends the script that long before the time limit; the run "
                        f"checkpoints and the task is requeued (default {slurm_requeue.DEFAULT_SIGNAL})")
    return p


def one_line(error: Exception) -> str:
    """An error's message on one line (YAML errors span several)."""
    text = f"{error.filename}: {error.strerror}" if isinstance(error, OSError) and error.filename else str(error)
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def whole_number(option: str, value: Any) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{option} {value!r}: a Slurm script needs a whole number here") from None


def write_script(path: Path, script: str, log_dir: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch --output needs it to exist


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        sweep = load_sweep(args.sweep, args.overrides, args.out_dir)
    except (ConfigError, OSError, UnicodeDecodeError) as e:
        print(f"agdlm sweep: {one_line(e)}", file=sys.stderr)
        return 2
    runs = sweep.runs
    if args.only:
        try:
            only = re.compile(args.only)
        except re.error as e:
            print(f"agdlm sweep: --only {args.only!r} is not a regular expression: {e}", file=sys.stderr)
            return 2
        runs = [r for r in runs if only.search(r.name)]
    done = [r for r in runs if r.finished]
    pending = [r for r in runs if not r.finished]

    if args.list:
        print(f"sweep {sweep.name}: {len(runs)} run(s) in {sweep.out_dir} ({len(done)} finished)")
        print(f"  every run: {' '.join(sweep.runs[0].configs + sweep.common)}")
        for r in runs:
            print(f"  {r.state:<8}  {r.name:<28} {' '.join(r.varied)}")
        return 0

    selected = runs if args.all else pending
    skipped_note = f"# {len(done)} finished run(s) skipped (DONE or DIVERGED): {', '.join(r.name for r in done)}" if done and not args.all else None
    if args.emit == "torchrun":
        print(f"# agdlm sweep {comment_text(str(sweep.path))}: {len(selected)} run(s) in {comment_text(str(sweep.out_dir))}")
        if skipped_note:
            print(skipped_note)
        for r in selected:
            print(shell_line(torchrun_command(r, args.nproc_per_node, args.nnodes, args.rdzv_endpoint)))
        return 0
    if args.emit == "slurm":
        if not selected:
            print(f"agdlm sweep: all {len(runs)} run(s) of {sweep.name} are finished; no script written")
            return 0
        out = Path(args.output) if args.output else sweep.out_dir / "sweep.sbatch"
        try:
            script = slurm_script(sweep, selected, gpus_per_node=whole_number("--nproc-per-node", args.nproc_per_node),
                                  nodes=whole_number("--nnodes", args.nnodes), time=args.time,
                                  cpus_per_task=args.cpus_per_task, max_parallel=args.max_parallel,
                                  sbatch=args.sbatch, setup=args.setup, signal=args.signal)
            write_script(out, script, sweep.out_dir / "slurm")
        except ConfigError as e:
            print(f"agdlm sweep: {one_line(e)}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"agdlm sweep: cannot write the Slurm script {out}: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"wrote {out}: {len(selected)} array task(s); submit with `sbatch {out}`")
        if skipped_note:
            print(skipped_note)
        return 0

    print(f"sweep {sweep.name}: {len(runs)} run(s) in {sweep.out_dir}; {len(done)} finished, {len(pending)} to run")
    results = run_locally(sweep, pending)
    by_name = {r.name: r for r in pending}
    diverged = [name for name, rc in results if rc != 0 and by_name[name].state == "diverged"]
    failed = [name for name, rc in results if rc != 0 and name not in diverged]
    print(f"sweep {sweep.name}: {len(results) - len(failed) - len(diverged)} run(s) finished here, {len(done)} before"
          + (f", {len(diverged)} diverged (a result, marked DIVERGED): {', '.join(diverged)}" if diverged else "")
          + (f", {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    print(f"compare them with: agdlm report {sweep.out_dir}")
    return 1 if failed else 0
