"""Slurm preemption and requeue (issue 22): the scripts ask Slurm for a signal before the time
limit and for requeueing, and on that signal stop the training (SIGTERM to srun, which forwards
it) and requeue the job. Both `agdlm sweep --emit slurm`'s script and launch/slurm.sbatch are run
with bash, with stand-ins for srun (runs its command in its place, so a signal reaches it as srun
forwards one), scontrol (records a requeue) and torchrun (waits for SIGTERM); the batch shell
gets SIGUSR1 as `--signal=B:USR1@120` sends it. A job id with shell syntax reaches scontrol as
one argument and runs nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_bad_inputs_tools import slurm_arguments

ROOT = Path(__file__).resolve().parents[1]

STUBS = {
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": ('#!/bin/bash\nif [[ "$1" == requeue ]]; then printf "%s\\n" "$@" > "$STUB_DIR/requeue"; '
                 "else echo node1; fi\n"),
    "torchrun": ('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_DIR/torchrun.args"\n'
                 '[[ -z "${STUB_EXIT:-}" ]] || exit "$STUB_EXIT"\n'
                 'trap \'echo TERM > "$STUB_DIR/torchrun.signal"; exit 1\' TERM\n'
                 'touch "$STUB_DIR/torchrun.ready"\nwhile :; do sleep 0.05; done\n'),
}


def stub_dir(tmp_path: Path) -> Path:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (stubs / "python").symlink_to(stubs / "torchrun")  # launch/torchrun.sh runs `$PYTHON -m torch.distributed.run`
    return stubs


def run_script(script: Path, stubs: Path, job_id: str, signal_to_send: int | None, *args: str,
               **env) -> subprocess.CompletedProcess:
    environment = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_DIR": str(stubs), "SLURM_JOB_ID": job_id,
                   "SLURM_ARRAY_TASK_ID": "0", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n1",
                   "PYTHON": str(stubs / "python"), **env}
    proc = subprocess.Popen(["bash", str(script), *args], env=environment, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if signal_to_send is not None:
        deadline = time.monotonic() + 60
        while not (stubs / "torchrun.ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal_to_send)  # Slurm signals the batch shell (B:)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def directives(script: str) -> list[list[str]]:
    return [slurm_arguments(line) for line in script.splitlines() if line.startswith("#SBATCH")]


HOSTILE_JOB_ID = "4242 $(touch MARKER) `touch MARKER`"


def emit_sweep_script(tmp_path: Path, *extra: str) -> Path:
    from agdlm.sweep import main

    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nconfigs: [model/tiny.yaml]\nset: {train.max_steps: 2}\n"
                     "axes:\n  seed: {key: train.seed, values: [0], name: 's{value}'}\n")
    out = tmp_path / "job.sbatch"
    assert main([str(sweep), "--out-dir", str(tmp_path / "runs"), "--emit", "slurm", "-o", str(out), *extra]) == 0
    return out


def test_sweep_script_asks_for_the_signal_and_requeues_on_it(tmp_path):
    script = emit_sweep_script(tmp_path)
    text = script.read_text()
    assert ["--signal=B:USR1@120"] in directives(text) and ["--requeue"] in directives(text)
    assert ["--open-mode=append"] in directives(text)
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110" in text

    stubs = stub_dir(tmp_path)
    result = run_script(script, stubs, HOSTILE_JOB_ID, signal.SIGUSR1)
    assert result.returncode == 1, result.stderr  # torchrun's status after the signal
    assert (stubs / "torchrun.signal").read_text().strip() == "TERM"  # forwarded as SIGTERM
    assert (stubs / "requeue").read_text().splitlines() == ["requeue", HOSTILE_JOB_ID]
    assert "agdlm train" in " ".join((stubs / "torchrun.args").read_text().splitlines())
    assert not (ROOT / "MARKER").exists() and not (tmp_path / "MARKER").exists()


def test_sweep_script_without_a_signal_does_not_requeue(tmp_path):
    script = emit_sweep_script(tmp_path, "--signal", "USR2@300")
    text = script.read_text()
    assert ["--signal=B:USR2@300"] in directives(text) and "trap 'stop USR2' USR2" in text
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-290" in text
    stubs = stub_dir(tmp_path)
    result = run_script(script, stubs, "77", None, STUB_EXIT="0")
    assert result.returncode == 0, result.stderr
    assert not (stubs / "requeue").exists()


def test_launch_slurm_sbatch_stops_torchrun_and_requeues(tmp_path):
    script = ROOT / "launch" / "slurm.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for wanted in (["--signal=B:USR1@120"], ["--requeue"], ["--open-mode=append"]):
        assert wanted in directives(text), wanted
    stubs = stub_dir(tmp_path)
    result = run_script(script, stubs, HOSTILE_JOB_ID, signal.SIGUSR1, "configs/tiny.yaml", "train.run_name=a b",
                        NPROC_PER_NODE="2")
    assert result.returncode == 1, result.stderr
    assert (stubs / "torchrun.signal").read_text().strip() == "TERM"
    assert (stubs / "requeue").read_text().splitlines() == ["requeue", HOSTILE_JOB_ID]
    args = (stubs / "torchrun.args").read_text().splitlines()
    assert args[:2] == ["-m", "torch.distributed.run"] and f"--rdzv-id={HOSTILE_JOB_ID}" in args
    assert args[-5:] == ["-m", "agdlm", "train", "configs/tiny.yaml", "train.run_name=a b"]
    assert not (ROOT / "MARKER").exists()
