"""Preemption and one decision for all ranks (issue 22): real processes, real signals.

A run gets SIGTERM (os.kill, or Popen.send_signal to torchrun, which forwards it as Slurm's
srun does) at a known place: the trainer's test hook AGDLM_FAULT_PAUSE_AT stops the last rank
there and writes its pid to a file; the test then signals. The run must checkpoint at the end
of the step in flight on every rank, exit 75 with the same line on every rank, and, relaunched,
finish on exactly the loss curve and weights of a run that was never interrupted (bitwise: CPU,
fp32). A second signal during the save changes nothing; SIGKILL during the save leaves the
previous checkpoint the newest good one. On 2 ranks, a data-quality stop that only one rank
sees stops both with the same line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agdlm.preemption import PREEMPTED_EXIT_CODE, read_pause_file
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
RUN = TINY + ["train.max_steps=6", "train.ckpt_interval=2", "train.eval_interval=2", "train.keep_checkpoints=3",
              "train.device=cpu", "train.precision=fp32"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---- launching and signalling ------------------------------------------------------------------

def run_args(run_dir: Path, *overrides: str) -> list[str]:
    return [*RUN, f"train.out_dir={run_dir.parent}", f"train.run_name={run_dir.name}", *overrides]


def one_process(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "agdlm", "train", *run_args(run_dir, *overrides)]


def two_ranks(run_dir: Path, *overrides: str) -> list[str]:
    """torchrun with each rank's output in its own file (logs/.../attempt_0/RANK/stderr.log)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            f"--log-dir={run_dir.parent / (run_dir.name + '.logs')}", "--redirects=3",
            "-m", "agdlm", "train", *run_args(run_dir, *overrides)]


def start(command: list[str], pause_at: str = "", pause_file: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    if pause_at:
        env.update(AGDLM_FAULT_PAUSE_AT=pause_at, AGDLM_FAULT_PAUSE_FILE=str(pause_file))
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a hung launch is killed whole


def finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers (a rank that acts alone hangs the others)
        out, err = proc.communicate()
        pytest.fail(f"the run did not end within {timeout} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def paused_pid(pause_file: Path, place: str, proc: subprocess.Popen, timeout: float = 180) -> int:
    """The pid of the rank paused at `place` (PLACE:STEP), once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for where, pid in read_pause_file(pause_file):
            if where == place:
                return pid
        if proc.poll() is not None:
            pytest.fail(f"the run ended before pausing at {place}:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no rank paused at {place} within {timeout} s")


def completed(command: list[str]) -> subprocess.CompletedProcess:
    return finish(start(command))


def rank_output(run_dir: Path, stream: str = "stderr") -> list[str]:
    """Each rank's stderr (or stdout) of the torchrun launch (its --log-dir; cleared before each
    launch read), rank 0 first."""
    logs = (run_dir.parent / (run_dir.name + ".logs")).glob(f"*/attempt_0/*/{stream}.log")
    return [p.read_text() for p in sorted(logs, key=lambda p: int(p.parent.name))]


def our_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("agdlm:")]


def clear_logs(run_dir: Path) -> None:
    shutil.rmtree(run_dir.parent / (run_dir.name + ".logs"), ignore_errors=True)


# ---- what a run left -------------------------------------------------------------------------

def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[tuple]:
    """The loss curve; the preemption marks are left out (a run never interrupted has none)."""
    return [(r["kind"], r["step"], r.get("train_loss", r.get("val_loss"))) for r in records(run_dir)
            if r["kind"] != "preempt"]


def preemption_marks(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["signal"], r["checkpoint"]) for r in records(run_dir) if r["kind"] == "preempt"]


def latest_step(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from agdlm.checkpoint import latest_checkpoint
    from agdlm.export import consolidated_state_dict, run_config

    return consolidated_state_dict(latest_checkpoint(run_dir), run_config(run_dir).model)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = final_weights(a), final_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))



# ---- one process: the exit code, a second signal and SIGKILL during the save ---------------------

@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = completed(one_process(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_sigterm_checkpoints_the_step_in_flight_and_a_second_one_changes_nothing(straight_run, tmp_path):
    run_dir, pause = tmp_path / "runs" / "preempted", tmp_path / "pause"
    proc = start(one_process(run_dir, "log.wandb=offline"), "between:2,save:3", pause)
    os.kill(paused_pid(pause, "between:2", proc), signal.SIGTERM)  # before step 3 starts
    os.kill(paused_pid(pause, "save:3", proc), signal.SIGTERM)  # again, while step 3's checkpoint is written
    result = finish(proc)

    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    lines = our_lines(result.stderr)
    assert len(lines) == 1 and "preempted by SIGTERM at step 3: checkpoint step_3 written" in lines[0], lines
    assert latest_step(run_dir) == "step_3" and not list((run_dir / "checkpoints").glob(".tmp_*"))
    assert preemption_marks(run_dir) == [(3, "SIGTERM", "step_3")]
    assert [r["step"] for r in records(run_dir) if r["kind"] == "train"][-1] == 3  # no step lost
    wandb_id = (run_dir / "wandb_id").read_text()

    resumed = completed(one_process(run_dir, "log.wandb=offline"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step_3 (step 3)" in resumed.stdout
    assert (run_dir / "wandb_id").read_text() == wandb_id  # the same W&B run goes on
    assert curve(run_dir) == curve(straight_run)
    assert same_weights(run_dir, straight_run)


def test_sigkill_during_the_save_leaves_the_newest_good_checkpoint(straight_run, tmp_path):
    run_dir, pause = tmp_path / "runs" / "killed", tmp_path / "pause"
    proc = start(one_process(run_dir), "between:2,save:3", pause)
    os.kill(paused_pid(pause, "between:2", proc), signal.SIGTERM)
    os.kill(paused_pid(pause, "save:3", proc), signal.SIGKILL)  # what torchrun does after its shutdown timeout
    assert finish(proc).returncode == -signal.SIGKILL
    assert latest_step(run_dir) == "step_2" and (run_dir / "checkpoints" / ".tmp_step_3").is_dir()

    resumed = completed(one_process(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert our_lines(resumed.stderr) == [] and "from step_2 (step 2)" in resumed.stdout
    assert curve(run_dir) == curve(straight_run)
    assert same_weights(run_dir, straight_run)


def test_checkpoints_written_before_manifests_still_load(straight_run, tmp_path):
    run_dir = Path(shutil.copytree(straight_run, tmp_path / "runs" / "old"))
    for folder in (run_dir / "checkpoints").glob("step_*"):
        (folder / "manifest.json").unlink()
        trainer = json.loads((folder / "trainer.json").read_text())
        del trainer["manifest"]
        (folder / "trainer.json").write_text(json.dumps(trainer))
    (run_dir / "DONE").unlink()
    result = completed(one_process(run_dir))
    assert result.returncode == 0 and our_lines(result.stderr) == [], result.stderr[-3000:]
    assert "from step_6 (step 6)" in result.stdout


def test_a_lost_manifest_is_a_damaged_checkpoint(straight_run, tmp_path):
    run_dir = Path(shutil.copytree(straight_run, tmp_path / "runs" / "lost"))
    (run_dir / "checkpoints" / "step_6" / "manifest.json").unlink()
    (run_dir / "DONE").unlink()
    result = completed(one_process(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = our_lines(result.stderr)
    assert len(lines) == 1 and "step_6/manifest.json is missing" in lines[0] and "corrupt_step_6" in lines[0], lines
    assert curve(run_dir) == curve(straight_run)


def agdlm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agdlm", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_sample_and_export_pass_over_a_damaged_checkpoint_and_leave_it(straight_run, tmp_path):
    run_dir = Path(shutil.copytree(straight_run, tmp_path / "runs" / "read"))
    flip_bytes(run_dir / "checkpoints" / "step_6" / "model.pt")
    out = tmp_path / "new" / "folder" / "model.safetensors"  # its folder does not exist yet

    exported = agdlm("export", run_dir, out)
    assert exported.returncode == 0, exported.stderr
    warning = exported.stderr.strip().splitlines()
    assert len(warning) == 1 and "step_6/model.pt does not match its manifest.json" in warning[0], warning
    assert "using step_4" in warning[0]
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["step"] == "4"
    sampled = agdlm("sample", run_dir, "--max-new-tokens", "2", "--device", "cpu")
    assert sampled.returncode == 0 and "using step_4" in sampled.stderr, sampled.stderr
    assert (run_dir / "checkpoints" / "step_6").is_dir()  # left where it is: only the trainer moves it aside

    chosen = agdlm("export", run_dir, tmp_path / "chosen.pt", "--checkpoint", "step_6")
    assert chosen.returncode == 2 and not (tmp_path / "chosen.pt").exists()
    assert len(chosen.stderr.strip().splitlines()) == 1 and "step_6/model.pt" in chosen.stderr


def test_checkpoints_by_time_as_well_as_by_steps(tiny_overrides):
    from agdlm.config import load_config
    from agdlm.train import train

    common = tiny_overrides + ["train.max_steps=4", "train.ckpt_interval=100", "train.keep_checkpoints=10"]
    by_time = Path(train(load_config(None, common + ["train.run_name=t", "train.ckpt_every_minutes=1e-6"]))["run_dir"])
    assert sorted(p.name for p in (by_time / "checkpoints").glob("step_*")) == [f"step_{n}" for n in (1, 2, 3, 4)]
    by_steps = Path(train(load_config(None, common + ["train.run_name=s"]))["run_dir"])
    assert sorted(p.name for p in (by_steps / "checkpoints").glob("step_*")) == ["step_4"]  # the end only


@pytest.mark.parametrize("override, named", [
    ("train.preempt_signals=[SIGKILL]", "SIGKILL cannot be caught"),
    ("train.preempt_signals=[TERM]", "'TERM' is not a signal name"),
    ("train.ckpt_every_minutes=0", "train.ckpt_every_minutes=0.0 must be positive"),
])
def test_bad_preemption_settings_are_one_config_line(override, named):
    from agdlm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])


# ---- two ranks under torchrun: FSDP2 and DeepSpeed ZeRO-2 -----------------------------------------

BACKENDS = {
    "fsdp2": ["parallel.backend=fsdp2"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
}


@pytest.fixture(scope="module", params=list(BACKENDS))
def two_rank_runs(request, tmp_path_factory) -> tuple[str, Path]:
    """(backend, a 6-step 2-rank run never interrupted: checkpoints at 2, 4, 6)."""
    if request.param == "zero2":
        pytest.importorskip("deepspeed")
    run_dir = tmp_path_factory.mktemp(request.param) / "straight"
    result = completed(two_ranks(run_dir, *BACKENDS[request.param]))
    assert result.returncode == 0, result.stderr[-4000:]
    return request.param, run_dir


@pytest.mark.slow
def test_two_ranks_preempted_between_steps_and_in_the_backward_lose_nothing(two_rank_runs, tmp_path):
    backend, straight = two_rank_runs
    run_dir, pause = tmp_path / "runs" / backend, tmp_path / "pause"
    args = BACKENDS[backend]

    # 1. rank 1 waits before step 3; torchrun gets SIGTERM (as from srun) and forwards it to both ranks
    proc = start(two_ranks(run_dir, *args), "between:2", pause)
    paused_pid(pause, "between:2", proc)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    assert result.returncode != 0  # torchrun itself ends on the signal
    lines = [our_lines(text) for text in rank_output(run_dir)]
    assert len(lines) == 2 and lines[0] == lines[1] and len(lines[0]) == 1, lines
    assert "preempted by SIGTERM at step 3: checkpoint step_3 written" in lines[0][0], lines
    assert latest_step(run_dir) == "step_3" and preemption_marks(run_dir) == [(3, "SIGTERM", "step_3")]

    # 2. only rank 1 gets SIGTERM, inside step 5's backward: rank 0 must stop and save with it
    clear_logs(run_dir)
    proc = start(two_ranks(run_dir, *args), "backward:5", pause)
    os.kill(paused_pid(pause, "backward:5", proc), signal.SIGTERM)
    result = finish(proc)
    assert result.returncode != 0
    assert len(re.findall(r"exitcode\s*:\s*75 ", result.stderr)) == 2, result.stderr[-3000:]  # torchrun's report
    lines = [our_lines(text) for text in rank_output(run_dir)]
    assert len(lines) == 2 and lines[0] == lines[1] and len(lines[0]) == 1, lines
    assert "preempted by SIGTERM at step 5: checkpoint step_5 written" in lines[0][0], lines
    assert latest_step(run_dir) == "step_5"  # the step in flight: none lost
    assert preemption_marks(run_dir) == [(3, "SIGTERM", "step_3"), (5, "SIGTERM", "step_5")]

    # 3. relaunched: the same curve and the same weights as the run never interrupted
    result = completed(two_ranks(run_dir, *args))
    assert result.returncode == 0, result.stderr[-4000:]
    assert curve(run_dir) == curve(straight)
    assert same_weights(run_dir, straight)


# ---- damaged checkpoint files: fallback, set aside, one line ---------------------------------------

DAMAGE = {  # backend: (file in step_6, how)
    "fsdp2": [("dcp/__1_0.distcp", truncate), ("dcp/__0_0.distcp", Path.unlink)],
    "zero2": [("deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", flip_bytes)],
}


@pytest.mark.slow
def test_damaged_shard_files_fall_back_to_the_newest_good_checkpoint(two_rank_runs, tmp_path):
    backend, straight = two_rank_runs
    for name, damage in DAMAGE[backend]:
        run_dir = Path(shutil.copytree(straight, tmp_path / damage.__name__ / "run"))
        clear_logs(run_dir)
        (run_dir / "DONE").unlink()  # as if it had been stopped after its last checkpoint
        damage(run_dir / "checkpoints" / "step_6" / name)
        result = completed(two_ranks(run_dir, *BACKENDS[backend]))
        assert result.returncode == 0, result.stderr[-4000:]
        warnings = [line for text in rank_output(run_dir) for line in our_lines(text)]
        assert len(warnings) == 1 and f"step_6/{name}" in warnings[0] and "corrupt_step_6" in warnings[0], warnings
        assert "from step_4 (step 4)" in rank_output(run_dir, "stdout")[0]
        assert (run_dir / "checkpoints" / "corrupt_step_6").is_dir() and latest_step(run_dir) == "step_6"
        assert curve(run_dir) == curve(straight)
        assert same_weights(run_dir, straight)


# ---- a data-quality stop one rank sees stops both --------------------------------------------------

@pytest.mark.slow
def test_a_bad_fraction_stop_on_one_rank_stops_both_with_the_same_line(tmp_path):
    from test_data_sources import jsonl_bytes, make_docs

    source = tmp_path / "docs"
    source.mkdir()
    (source / "a.jsonl").write_bytes(jsonl_bytes(make_docs(1200)))  # rank 0's file, clean; the val split's too
    b = jsonl_bytes(make_docs(20, prefix="b")) + b'{"text": 5}\n' * 40  # rank 1's: mostly unreadable
    (source / "b.jsonl").write_bytes(b)
    run_dir = tmp_path / "runs" / "bad"
    result = completed(two_ranks(run_dir, "parallel.backend=ddp", f"data.source={source}", "data.mode=stream"))

    assert result.returncode != 0 and len(re.findall(r"exitcode\s*:\s*2 ", result.stderr)) == 2, result.stderr[-3000:]
    texts = rank_output(run_dir)
    lines = [our_lines(text) for text in texts]
    assert len(lines) == 2 and lines[0] == lines[1] and len(lines[0]) == 1, texts
    assert "agdlm: data error:" in lines[0][0] and "b.jsonl" in lines[0][0] and "max_bad_fraction" in lines[0][0]
    assert "rank 1 of 2" in lines[0][0] and not any("Traceback" in text for text in texts), lines
