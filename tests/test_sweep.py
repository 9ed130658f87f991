"""Sweep files: expansion (counts, names, overrides), skipping finished runs, the local
runner, and launch text (torchrun lines, a Slurm array script) that parses back into the
same runs."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agdlm.config import ConfigError
from agdlm.sweep import find_sweep_file, load_sweep, main, short_number, slurm_script
from agdlm.train import parse_args

SMALL = """
name: mini
configs: [model/tiny.yaml]
set: {model.n_layer: 2, model.block_size: 32, train.global_batch_size: 8, train.micro_batch_size: 4,
      train.max_steps: 2, train.eval_interval: 2, train.eval_batches: 1, train.device: cpu,
      parallel.backend: single, log.interval: 1, data.val_fraction: 0.1}
axes:
  width:
    - {name: w32, set: {model.n_embd: 32, model.n_head: 2}}
  optim:
    - {name: agd, set: {optim.name: agd}}
    - {name: "adamw-lr{optim.lr}", set: {optim.name: adamw, optim.warmup_steps: 1}, grid: {optim.lr: [3.0e-3]}}
"""


def write(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_from_args(args):
    from agdlm.config import load_config

    files, overrides = parse_args(args)
    return load_config(files or None, overrides)


def test_width_ladder_expands_agd_once_and_adamw_per_lr(tmp_path):
    sweep = load_sweep("width-ladder", out_dir=tmp_path)
    assert sweep.name == "width-ladder" and sweep.out_dir == tmp_path / "width-ladder"
    widths = [128, 256, 384, 512, 640, 768]
    assert len(sweep.runs) == len(widths) * (1 + 5)  # AGD is not multiplied by the lr grid
    names = [r.name for r in sweep.runs]
    assert len(set(names)) == len(names)
    assert names[:6] == ["w128-agd-s0", "w128-adamw-lr1e-4-s0", "w128-adamw-lr3e-4-s0", "w128-adamw-lr1e-3-s0",
                         "w128-adamw-lr3e-3-s0", "w128-adamw-lr1e-2-s0"]
    by_name = {r.name: r for r in sweep.runs}
    seen = {}
    for r in sweep.runs:
        cfg = r.config()
        seen.setdefault(cfg.optim.name, set()).add((cfg.model.n_embd, cfg.optim.lr if cfg.optim.name == "adamw" else None))
        assert cfg.model.n_layer == 4 and cfg.model.n_embd // cfg.model.n_head == 64  # fixed depth, head size 64
        assert cfg.train.run_name == r.name and cfg.log.group == "width-ladder"
        assert Path(cfg.train.out_dir) / r.name == r.run_dir
        assert cfg.log.tags == [f"width={r.axes['width']}", f"optim={r.axes['optim']}", "seed=s0"]
    assert seen["agd"] == {(w, None) for w in widths}
    assert seen["adamw"] == {(w, lr) for w in widths for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}
    adamw = by_name["w512-adamw-lr3e-3-s0"].config()
    assert (adamw.optim.name, adamw.optim.lr, adamw.optim.min_lr, adamw.model.n_embd) == ("adamw", 3e-3, None, 512)  # min_lr None: lr/10
    agd = by_name["w768-agd-s0"].config()
    assert (agd.optim.name, agd.model.n_embd, agd.model.n_head) == ("agd", 768, 12)


def test_cpu_smoke_is_eight_small_runs():
    sweep = load_sweep(find_sweep_file("configs/sweeps/cpu-smoke.yaml"))
    assert [r.name for r in sweep.runs] == [
        f"w{w}-{o}-s0" for w in (64, 128) for o in ("agd", "adamw-lr1e-3", "adamw-lr3e-3", "adamw-lr1e-2")]
    cfg = sweep.runs[0].config()
    assert (cfg.model.n_layer, cfg.model.block_size, cfg.data.source, cfg.train.max_steps) == (2, 64, "demo", 100)


def test_axis_forms_overrides_and_order(tmp_path):
    path = write(tmp_path, """
name: forms
configs: [model/tiny.yaml]
set: {optim: {name: adamw, lr: 1.0e-3}, train.max_steps: 10}
axes:
  seed: {key: train.seed, values: [0, 1], name: "s{value}"}
  optim:
    - {name: agd, set: {optim.name: agd}}
    - {name: "adamw-lr{optim.lr}-b{optim.betas}", grid: {optim.lr: [0.5, 2.5e-3], optim.betas: [[0.9, 0.99]]}}
""")
    sweep = load_sweep(path, ["train.max_steps=7", "model.n_embd=64"], out_dir=tmp_path / "out")
    names = [r.name for r in sweep.runs]
    assert names == ["s0-agd", "s0-adamw-lr0.5-b0.9_0.99", "s0-adamw-lr2.5e-3-b0.9_0.99",
                     "s1-agd", "s1-adamw-lr0.5-b0.9_0.99", "s1-adamw-lr2.5e-3-b0.9_0.99"]
    cfgs = {r.name: r.config() for r in sweep.runs}
    cfg = cfgs[names[2]]
    assert cfg.train.max_steps == 7 and cfg.model.n_embd == 64 and cfg.train.seed == 0  # CLI after `set`
    assert cfg.optim.lr == 2.5e-3 and cfg.optim.betas == (0.9, 0.99)
    assert cfgs["s1-agd"].optim.name == "agd" and cfgs["s1-agd"].train.seed == 1


def test_run_names_must_be_safe_and_distinct(tmp_path):
    dup = write(tmp_path, "axes:\n  a:\n    - {name: x, set: {train.seed: 1}}\n    - {name: x, set: {train.seed: 2}}\n")
    with pytest.raises(ConfigError, match="both named 'x'"):
        load_sweep(dup)
    slash = write(tmp_path, "axes:\n  a:\n    - {name: 'a/b', set: {train.seed: 1}}\n", "s2.yaml")
    with pytest.raises(ConfigError, match="run name"):
        load_sweep(slash)
    bad_key = write(tmp_path, "axes:\n  a:\n    - {name: x, set: {nosection.lr: 1}}\n", "s3.yaml")
    with pytest.raises(ConfigError, match="not section.key"):
        load_sweep(bad_key)
    bad_value = write(tmp_path, "axes:\n  a:\n    - {name: x, set: {optim.name: sgd}}\n", "s4.yaml")
    with pytest.raises(ConfigError, match="run x: optim.name='sgd'"):
        load_sweep(bad_value)
    missing = write(tmp_path, "axes:\n  a:\n    - {name: 'lr{optim.lr}', set: {optim.name: agd}}\n", "s5.yaml")
    with pytest.raises(ConfigError, match=r"refers to \{optim.lr\}"):
        load_sweep(missing)


def test_short_numbers():
    assert [short_number(x) for x in (3e-3, 1e-2, 1e-4, 2.5e-3, 0.5, 0.0, 2000.0, 6e-4)] == \
        ["3e-3", "1e-2", "1e-4", "2.5e-3", "0.5", "0", "2000", "6e-4"]


def test_torchrun_lines_parse_back_into_the_same_runs(tmp_path, capsys):
    sweep = load_sweep("width-ladder", out_dir=tmp_path)
    assert main(["width-ladder", "--out-dir", str(tmp_path), "--emit", "torchrun", "--nproc-per-node", "8"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(sweep.runs)
    for line, run in zip(lines, sweep.runs):
        argv = shlex.split(line)
        assert argv[:3] == ["torchrun", "--nnodes=1", "--nproc_per_node=8"]
        args = argv[argv.index("-m") + 3:]
        assert argv[argv.index("-m") + 1:argv.index("-m") + 3] == ["agdlm", "train"]
        assert config_from_args(args) == run.config()


def test_slurm_script_is_valid_bash_and_parses_back(tmp_path):
    sweep = load_sweep("width-ladder", out_dir=tmp_path)
    out = tmp_path / "ladder.sbatch"
    assert main(["width-ladder", "--out-dir", str(tmp_path), "--emit", "slurm", "-o", str(out), "--nproc-per-node", "4",
                 "--sbatch=--partition=gpu", "--max-parallel", "6", "--setup", "source .venv/bin/activate"]) == 0
    script = out.read_text()
    assert subprocess.run(["bash", "-n", str(out)], capture_output=True).returncode == 0
    assert script.startswith("#!/bin/bash\n")
    assert f"#SBATCH --array=0-{len(sweep.runs) - 1}%6" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-node=4" in script and (tmp_path / "width-ladder" / "slurm").is_dir()
    arms = re.findall(r"^  (\d+)\) # (\S+)\n    task=\(srun (.*)\) ;;$", script, flags=re.M)
    assert [int(i) for i, _, _ in arms] == list(range(len(sweep.runs)))
    for (_, name, line), run in zip(arms, sweep.runs):
        argv = shlex.split(line)
        assert name == run.name and argv[0] == "torchrun" and "--nproc_per_node=4" in argv
        assert config_from_args(argv[argv.index("-m") + 3:]) == run.config()
    # the array task really selects its run: execute the case with srun/torchrun stubbed
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/bash\n"$@"\n')
    (stub / "scontrol").write_text("#!/bin/bash\necho node1\n")
    (stub / "torchrun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    for f in stub.iterdir():
        f.chmod(0o755)
    body = script.replace("source .venv/bin/activate", "")
    env = {"PATH": f"{stub}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1"}
    res = subprocess.run(["bash", "-c", body], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    argv = res.stdout.splitlines()
    assert "--rdzv_endpoint=node1:29507" in argv
    assert config_from_args(argv[argv.index("-m") + 3:]) == sweep.runs[7].config()


def test_local_runs_then_skips_finished(tmp_path, capsys):
    path = write(tmp_path, SMALL)
    out = tmp_path / "runs"
    assert main([str(path), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 to run" in text and "2 run(s) finished here" in text
    for name in ("w32-agd", "w32-adamw-lr3e-3"):
        run_dir = out / "mini" / name
        assert (run_dir / "DONE").is_file()
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["log"]["group"] == "mini" and cfg["train"]["run_name"] == name
        timing = json.loads((run_dir / "timing.json").read_text())  # whether its speed figures are comparable
        assert isinstance(timing["idle"], bool) and timing["samples"] >= 2 and timing["note"]
    # a second launch runs nothing; torchrun/slurm output leaves finished runs out
    assert main([str(path), "--out-dir", str(out)]) == 0
    assert "2 finished, 0 to run" in capsys.readouterr().out
    assert main([str(path), "--out-dir", str(out), "--emit", "torchrun"]) == 0
    printed = capsys.readouterr().out
    assert "2 finished run(s) skipped (DONE or DIVERGED)" in printed and "torchrun --" not in printed
    (out / "mini" / "w32-agd" / "DONE").unlink()
    assert main([str(path), "--out-dir", str(out), "--list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"todo\s+w32-agd ", listing) and re.search(r"done\s+w32-adamw-lr3e-3 ", listing)


def test_a_run_that_diverges_is_a_result_the_sweep_does_not_run_again(tmp_path, capsys, monkeypatch):
    """AGD's skip limit stops the run (exit 3): the trainer marks it DIVERGED, the sweep counts it
    as diverged, not failed (exit 0), and neither lists it as to do nor runs it again."""
    path = write(tmp_path, SMALL.replace("train.max_steps: 2", "train.max_steps: 4"))
    out = tmp_path / "runs"
    monkeypatch.setenv("AGDLM_FAULT_INF_GRAD_FROM_STEP", "0")  # every AGD update sees an inf gradient
    args = [str(path), "train.max_skipped_steps=2", "--out-dir", str(out), "--only=agd"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "0 run(s) finished here, 0 before, 1 diverged (a result, marked DIVERGED): w32-agd" in text
    run_dir = out / "mini" / "w32-agd"
    assert "skipped 2 steps in a row" in (run_dir / "DIVERGED").read_text() and not (run_dir / "DONE").exists()
    assert main([*args, "--list"]) == 0
    assert re.search(r"diverged\s+w32-agd ", capsys.readouterr().out)
    assert main(args) == 0
    assert "1 finished, 0 to run" in capsys.readouterr().out


def test_cli_entry_point(tmp_path):
    path = write(tmp_path, SMALL)
    res = subprocess.run([sys.executable, "-m", "agdlm", "sweep", str(path), "--list", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "sweep mini: 2 run(s)" in res.stdout
    res = subprocess.run([sys.executable, "-m", "agdlm", "sweep", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert res.returncode == 2 and "sweep file not found" in res.stderr


def test_load_watch_marks_a_run_idle_only_below_its_own_load():
    from agdlm.load_watch import MARGIN, LoadWatch

    watch = LoadWatch(own_load=2.0)
    watch.samples = [1.8, 2.0 + MARGIN]  # the run alone (with its loader and the OS): idle
    assert watch.idle and watch.record()["note"] == "machine otherwise idle"
    watch.samples.append(2.0 + MARGIN + 0.01)  # one more busy job for a while: not idle
    record = watch.record()
    assert record["idle"] is False and record["max_loadavg_1min"] == round(2.0 + MARGIN + 0.01, 2)
    assert "not idle" in record["note"]
