"""Bad inputs to `agdlm sweep` and `agdlm report` (issue 9, items 2, 9 and 11): each is
built for real (sweep files, run folders, output paths) and run through the real command.
Every refusal is exit 2 with one stderr line naming the file or key, no traceback, and
nothing already on disk changed. Values with shell syntax in an emitted Slurm script are
quoted: the script is run with bash (srun, scontrol and torchrun replaced by small scripts
that print their arguments) and no `$(touch MARKER)` or backquote in a value runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agdlm.config import config_to_yaml, load_config
from test_sweep import config_from_args

SWEEP = """
name: inj
configs: [model/tiny.yaml]
set: {{train.max_steps: 2, train.out_dir: {out_dir}, log.project: {project}}}
axes:
  seed: {{key: train.seed, values: {values}, name: "s{{value}}"}}
  optim:
    - {{name: agd, set: {{optim.name: agd}}}}
    - {{name: adamw, set: {{optim.name: adamw, optim.lr: 3.0e-3}}}}
"""


def sweep_file(root: Path, *, out_dir: str = "runs", project: str = "agdlm", values: str = "[0]",
               name: str = "sweep.yaml") -> Path:
    path = root / name
    path.write_text(SWEEP.format(out_dir=json.dumps(out_dir), project=json.dumps(project), values=values))
    return path


def agdlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agdlm", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under root with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def write_run(root: Path, name: str, optim: list[str], final_loss: float = 4.0) -> Path:
    cfg = load_config(None, ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
                             f"train.run_name={name}"] + optim)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    records = [{"step": 0, "tokens": 0, "kind": "eval", "val_loss": 7.0},
               {"step": 10, "tokens": 1000, "kind": "train", "train_loss": 5.0, "tokens_per_s": 100.0},
               {"step": 10, "tokens": 1000, "kind": "eval", "val_loss": final_loss}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "DONE").write_text("done\n")
    return run


# ---- the table: exit 2, one line naming the file or key, nothing changed ---------------

def case_out_dir_newline(root):
    marker = root / "MARKER"
    path = sweep_file(root, out_dir=f"{root}/out\n$(touch {marker})")
    return ["sweep", str(path), "--emit", "slurm", "-o", "prev.sbatch"], "train.out_dir"


def case_cli_out_dir_newline(root):
    path = sweep_file(root)
    return ["sweep", str(path), "--emit", "slurm", "-o", "prev.sbatch", "--out-dir", f"o\n$(touch {root}/MARKER)"], \
        "--out-dir"


def case_sbatch_option_newline(root):
    path = sweep_file(root)
    return ["sweep", str(path), "--emit", "slurm", "-o", "prev.sbatch", "--sbatch", f"--partition=gpu\ntouch {root}/MARKER"], \
        "--sbatch"


def case_time_newline(root):
    path = sweep_file(root)
    return ["sweep", str(path), "--emit", "slurm", "-o", "prev.sbatch", "--time", f"1:00:00\ntouch {root}/MARKER"], "--time"


def case_signal_with_shell_syntax(root):
    path = sweep_file(root)
    return ["sweep", str(path), "--emit", "slurm", "-o", "prev.sbatch", "--signal", f"USR1@120\ntouch {root}/MARKER"], \
        "--signal"


def case_signal_too_late_to_checkpoint(root):
    path = sweep_file(root)
    return ["sweep", str(path), "--emit", "slurm", "-o", "prev.sbatch", "--signal", "USR1@5"], "--signal"


def case_nproc_not_a_number(root):
    path = sweep_file(root)
    return ["sweep", str(path), "--emit", "slurm", "-o", "prev.sbatch", "--nproc-per-node", "gpu"], "--nproc-per-node"


def case_sweep_values_not_a_list(root):
    return ["sweep", str(sweep_file(root, values="5")), "--list"], "axes.seed.values"


def case_sweep_values_empty(root):
    return ["sweep", str(sweep_file(root, values="[]")), "--list"], "axes.seed.values"


def case_sweep_configs_not_names(root):
    path = root / "sweep.yaml"
    path.write_text("name: bad\nconfigs: 5\n")
    return ["sweep", str(path), "--list"], "configs"


def case_slurm_output_under_a_file(root):
    path = sweep_file(root)
    return ["sweep", str(path), "--emit", "slurm", "-o", "prev.sbatch/x.sbatch"], "prev.sbatch/x.sbatch"


def case_report_out_under_a_file(root):
    write_run(root / "runs", "a", ["optim.name=agd"])
    (root / "notes.txt").write_text("mine\n")
    return ["report", "runs", "-o", "notes.txt/report"], "notes.txt/report"


def case_report_out_is_a_file(root):
    write_run(root / "runs", "a", ["optim.name=agd"])
    (root / "notes.txt").write_text("mine\n")
    return ["report", "runs", "-o", "notes.txt"], "notes.txt"


def case_report_only_run_has_garbage_config(root):
    run = write_run(root / "runs", "a", ["optim.name=agd"])
    (run / "config.yaml").write_text("model: [unclosed\n")
    return ["report", "runs", "-o", "rep"], "config.yaml"


def case_report_only_run_has_garbage_metrics(root):
    run = write_run(root / "runs", "a", ["optim.name=agd"])
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe garbage\n[1, 2]\n7\n{\"step\": \"x\"}\n")
    return ["report", "runs", "-o", "rep"], "metrics.jsonl"


def case_report_run_config_with_wrong_types(root):
    run = write_run(root / "runs", "a", ["optim.name=adamw"])
    (run / "config.yaml").write_text("model: {n_embd: wide}\noptim: {name: adamw}\n")
    return ["report", "runs", "-o", "rep"], "config.yaml"


def case_report_timing_runs_missing(root):
    write_run(root / "runs", "a", ["optim.name=agd"])
    return ["report", "runs", "--timing-runs", "no-such-timing", "-o", "rep"], "no-such-timing"


CASES = [case_out_dir_newline, case_cli_out_dir_newline, case_sbatch_option_newline, case_time_newline,
         case_signal_with_shell_syntax, case_signal_too_late_to_checkpoint,
         case_nproc_not_a_number, case_sweep_values_not_a_list, case_sweep_values_empty, case_sweep_configs_not_names,
         case_slurm_output_under_a_file, case_report_out_under_a_file, case_report_out_is_a_file,
         case_report_only_run_has_garbage_config, case_report_only_run_has_garbage_metrics,
         case_report_run_config_with_wrong_types, case_report_timing_runs_missing]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    args, named = case(tmp_path)
    (tmp_path / "prev.sbatch").write_text("#!/bin/bash\n# an earlier script: must survive\n")
    before = snapshot(tmp_path)
    res = agdlm(*args, cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert named in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
    assert not (tmp_path / "MARKER").exists()


# ---- values with shell syntax are quoted: running the script runs none of it -------------

STUBS = {
    "srun": '#!/bin/bash\n"$@"\n',
    "scontrol": "#!/bin/bash\necho node1\n",
    "torchrun": '#!/bin/bash\nprintf "%s\\n" "$@"\n',
}


def run_array_task(script: str, task: int, tmp_path: Path) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    env = {"PATH": f"{stub}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": str(task), "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "n1"}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)


def slurm_arguments(line: str) -> list[str]:
    """The arguments Slurm reads from one `#SBATCH` line: its own rules (sbatch/opt.c
    _get_argument): double quotes group, backslash escapes, unescaped # ends the line."""
    text, args = line.removeprefix("#SBATCH"), []
    i = 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            break
        arg, quoted = "", False
        while i < len(text) and (quoted or not text[i].isspace()):
            c = text[i]
            if c == "\\":
                arg, i = arg + text[i + 1], i + 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == "#":
                return args + [arg]
            else:
                arg += c
            i += 1
        args.append(arg)
    return args


def test_shell_syntax_in_sweep_values_never_runs(tmp_path):
    markers = [tmp_path / f"MARKER{i}" for i in range(4)]
    out_dir = f"{tmp_path}/o $(touch {markers[0]}) `touch {markers[1]}` \"q\" 'a' #h"
    project = f"p$(touch {markers[2]})`touch {markers[3]}`"
    # the sweep file's own name lands in a comment line of the script
    name = "s\n$(touch MARKER_NAME).yaml"  # relative: the script runs in tmp_path
    path = sweep_file(tmp_path, out_dir=out_dir, project=project, name=name)
    res = agdlm("sweep", str(path), "--emit", "slurm", "-o", "job.sbatch", "--sbatch", "--comment='a b # c'",
                cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    script = (tmp_path / "job.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert slurm_arguments(next(d for d in directives if "--output=" in d)) == [
        f"--output={out_dir}/inj/slurm/%x-%A_%a.out"]
    assert slurm_arguments(next(d for d in directives if "--comment" in d)) == ["--comment=a b # c"]

    from agdlm.sweep import load_sweep

    sweep = load_sweep(path)
    for task, run in enumerate(sweep.runs):
        done = run_array_task(script, task, tmp_path)
        assert done.returncode == 0, done.stderr
        argv = done.stdout.splitlines()
        assert config_from_args(argv[argv.index("-m") + 3:]) == run.config()
        assert run.config().log.project == project and run.config().train.out_dir == f"{out_dir}/inj"
    assert not any(m.exists() for m in markers) and not (tmp_path / "MARKER_NAME").exists()


# ---- a bad run among good ones: the report names it and goes on ---------------------------

def test_report_names_bad_runs_and_counts_malformed_lines(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "good-agd", ["optim.name=agd"], final_loss=4.5)
    write_run(runs, "good-adamw", ["optim.name=adamw", "optim.lr=3e-3"], final_loss=4.0)
    partly = write_run(runs, "partly", ["optim.name=adamw", "optim.lr=1e-3"], final_loss=4.2)
    with open(partly / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n\xff\xfe\n{"step": 11, "tokens": "many", "kind": "train"}\n{"step": 12, "tok')
    unreadable = write_run(runs, "unreadable", ["optim.name=agd"])
    (unreadable / "config.yaml").write_bytes(b"\xff\xfe not utf-8")
    garbage = write_run(runs, "garbage", ["optim.name=agd"])
    (garbage / "metrics.jsonl").write_bytes(b"\x00\x01\x02\n\x03\n")

    res = agdlm("report", "runs", "-o", "rep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    warnings = res.stderr.strip().splitlines()
    assert len(warnings) == 3 and "Traceback" not in res.stderr, res.stderr
    assert any("runs/partly/metrics.jsonl: skipped 4 malformed line(s) (line 4, 5, 6, 7)" in w for w in warnings), warnings
    assert any("unreadable/config.yaml" in w and "skipped run" in w for w in warnings), warnings
    assert any("garbage/metrics.jsonl" in w and "no readable record (2 malformed line(s))" in w for w in warnings)
    md = (tmp_path / "rep" / "report.md").read_text()
    for name in ("good-agd", "good-adamw", "partly"):
        assert f"| {name} |" in md
    assert "| unreadable |" not in md and "| garbage |" not in md
    assert "Skipped or partly read:" in md


# ---- a reader that goes away early (`| head`, `| grep -q`) is not an error of ours ----------

def test_closed_stdout_gives_no_traceback(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` has read its lines
    try:
        done = subprocess.run([sys.executable, "-m", "agdlm", "layers", "model/tiny.yaml"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141
