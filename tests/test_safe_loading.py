"""Foreign run folders execute nothing (issue 9, items 1, 3, 11, 12 for export and sample).

Real run folders are trained here (single, FSDP2 and DeepSpeed ZeRO-2 on one CPU process);
crafted pickles whose unpickling writes a marker file are put where a shared folder could
hold them: the DCP `.metadata`, a DCP non-tensor item, DeepSpeed's model-states file. No
command may create the marker. Every refusal is one stderr line, exit 2, and leaves every
file of the run folder as it was."""

from __future__ import annotations

import argparse
import hashlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.vocab_size=257", "data.tokenizer=bytes",
    "train.global_batch_size=8", "train.micro_batch_size=4", "data.val_fraction=0.1", "train.eval_batches=2",
    "log.interval=1", "train.max_steps=2", "train.ckpt_interval=2", "train.eval_interval=2", "train.device=cpu",
    "train.precision=fp32",
]  # fmt: skip
BACKENDS = {
    "single": ["parallel.backend=single", "optim.name=agd"],
    "fsdp2": ["parallel.backend=fsdp2", "optim.name=adamw"],  # AdamW: DCP holds non-tensor items too
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2", "optim.name=agd"],
}


class WritesMarker:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def agdlm(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agdlm", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def pristine_runs(tmp_path_factory, agdlm_cache) -> Path:
    """One finished 2-step run per checkpoint layout, trained by `agdlm train`."""
    out = tmp_path_factory.mktemp("pristine")
    for name, overrides in BACKENDS.items():
        proc = agdlm("train", *TINY, *overrides, f"train.out_dir={out}", f"train.run_name={name}", timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(pristine_runs, tmp_path):
    """A fresh copy of a pristine run folder, so each test may damage its own."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(pristine_runs / name, tmp_path / "runs" / name))

    return copy


def step_folder(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def reseal(run: Path) -> None:
    """Rewrite the checkpoint's manifest after changing a file, as whoever crafted the folder
    would: the manifest catches damage, not a rewritten folder; the safe readers must."""
    from agdlm.manifest import seal

    seal(step_folder(run))


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# ---- crafted payloads ---------------------------------------------------------------------------
def plant_dcp_metadata(run: Path, marker: Path) -> Path:
    target = step_folder(run) / "dcp" / ".metadata"
    target.write_bytes(pickle.dumps(WritesMarker(marker)))
    reseal(run)
    return target


def plant_deepspeed_model_states(run: Path, marker: Path) -> Path:
    target = step_folder(run) / "deepspeed" / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=False)  # our own honest file
    state["module"] = WritesMarker(marker)
    torch.save(state, target)
    reseal(run)
    return target


def plant_dcp_bytes_item(run: Path, marker: Path) -> Path:
    """Rewrite the DCP checkpoint with an optimiser param_group value that is the payload: a
    non-tensor item, which DCP's default planner unpickles with weights_only=False."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_dir = step_folder(run) / "dcp"
    whole = run.parent / "whole.pt"
    dcp_to_torch_save(dcp_dir, whole)
    state = torch.load(whole, weights_only=False)  # our own honest file
    state["optim"]["param_groups"][0]["lr"] = WritesMarker(marker)
    shutil.rmtree(dcp_dir)
    dcp.save(state, checkpoint_id=str(dcp_dir), no_dist=True)
    whole.unlink()
    reseal(run)
    return dcp_dir


CRAFTED = {
    "fsdp2-metadata": ("fsdp2", plant_dcp_metadata),
    "zero2-model-states": ("zero2", plant_deepspeed_model_states),
}


@pytest.mark.parametrize("command", ["export", "sample"])
@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_checkpoint_runs_nothing_in_export_or_sample(run_copy, tmp_path, case, command):
    backend, plant = CRAFTED[case]
    run, marker = run_copy(backend), tmp_path / "PAYLOAD_RAN"
    planted = plant(run, marker)
    before = file_hashes(run)
    args = ["export", run, tmp_path / "model.pt"] if command == "export" else ["sample", run, "--max-new-tokens", "2"]
    proc = agdlm(*args)
    assert not marker.exists(), "the crafted pickle was executed"
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert str(planted) in line and "--trust-checkpoint" in line, line
    assert file_hashes(run) == before
    assert not (tmp_path / "model.pt").exists()


RESUME_CRAFTED = {
    "fsdp2-metadata": ("fsdp2", plant_dcp_metadata),
    "fsdp2-optimizer-item": ("fsdp2", plant_dcp_bytes_item),
    "zero2-model-states": ("zero2", plant_deepspeed_model_states),
}


@pytest.mark.parametrize("case", list(RESUME_CRAFTED))
def test_resuming_a_crafted_run_folder_runs_nothing(run_copy, tmp_path, case):
    backend, plant = RESUME_CRAFTED[case]
    run, marker = run_copy(backend), tmp_path / "PAYLOAD_RAN"
    planted = plant(run, marker)
    (run / "DONE").unlink()  # as if the run had been killed: the launch resumes it
    proc = agdlm("train", *TINY, *BACKENDS[backend], f"train.out_dir={run.parent}", f"train.run_name={run.name}")
    assert not marker.exists(), "the crafted pickle was executed"
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert str(planted) in line and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_honest_checkpoints_of_every_layout_export_and_sample(run_copy, tmp_path):
    """The safe readers give exactly what the backends' own (unrestricted) readers give."""
    for name in BACKENDS:
        run = run_copy(name)
        safe, trusted = tmp_path / f"{name}.pt", tmp_path / f"{name}_trusted.pt"
        for out, extra in ((safe, []), (trusted, ["--trust-checkpoint"])):
            proc = agdlm("export", run, out, *extra)
            assert proc.returncode == 0, proc.stderr[-3000:]
        a, b = (torch.load(p, weights_only=True)["model"] for p in (safe, trusted))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        proc = agdlm("sample", run, "--max-new-tokens", "3", "--device", "cpu")
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]


def test_trust_checkpoint_loads_a_type_outside_the_allow_list(run_copy, tmp_path):
    """A harmless object that no checkpoint needs (an argparse.Namespace in the state dict's
    metadata) is refused by default, and loads with the explicit opt-in."""
    run = run_copy("single")
    model_file = step_folder(run) / "model.pt"
    state = torch.load(model_file, weights_only=True)
    state._metadata[""]["made_by"] = argparse.Namespace(user="me")  # load_state_dict ignores it
    torch.save(state, model_file)
    reseal(run)
    refused = agdlm("export", run, tmp_path / "m.pt")
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = one_line(refused.stderr)
    assert str(model_file) in line and "argparse.Namespace" in line and "--trust-checkpoint" in line, line
    trusted = agdlm("export", run, tmp_path / "m.pt", "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr[-3000:]


# ---- one line, exit 2, nothing changed -----------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def export_onto_live_checkpoint(run, tmp):
    return ["export", run, step_folder(run) / "model.pt"], "checkpoints"


def export_onto_a_directory(run, tmp):
    (tmp / "taken.pt").mkdir()
    return ["export", run, tmp / "taken.pt"], "taken.pt"


def export_under_a_file(run, tmp):
    (tmp / "plain.txt").write_text("x")
    return ["export", run, tmp / "plain.txt" / "model.pt"], "not a directory"


def export_with_empty_trainer_json(run, tmp):
    (step_folder(run) / "trainer.json").write_text("")
    return ["export", run, tmp / "model.pt"], "trainer.json"


def export_without_model_pt(run, tmp):
    (step_folder(run) / "model.pt").unlink()
    return ["export", run, tmp / "model.pt"], "model.pt"


def sample_truncated_model_pt(run, tmp):
    _truncate(step_folder(run) / "model.pt")
    return ["sample", run], "model.pt"


def sample_truncated_dcp_metadata(run, tmp):
    _truncate(step_folder(run) / "dcp" / ".metadata")
    return ["sample", run], ".metadata"


def sample_truncated_deepspeed_optimizer(run, tmp):
    _truncate(step_folder(run) / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return ["sample", run], "optim_states.pt"


def sample_a_text_file(run, tmp):
    (tmp / "notes.txt").write_text("not a model\n")
    return ["sample", tmp / "notes.txt"], "notes.txt"


def sample_a_plain_state_dict(run, tmp):
    shutil.copy(step_folder(run) / "model.pt", tmp / "weights.pt")  # a checkpoint file, not an export
    return ["sample", tmp / "weights.pt"], "agdlm export"


def sample_top_k_zero(run, tmp):
    return ["sample", run, "--top-k", "0"], "--top-k"


def sample_on_cuda_without_cuda(run, tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["sample", run, "--device", "cuda"], "--device cuda"


BAD_INPUTS = {
    f.__name__: (backend, f)
    for backend, f in [
        ("single", export_onto_live_checkpoint),
        ("single", export_onto_a_directory), ("single", export_under_a_file),
        ("single", export_with_empty_trainer_json), ("single", export_without_model_pt),
        ("single", sample_truncated_model_pt), ("fsdp2", sample_truncated_dcp_metadata),
        ("zero2", sample_truncated_deepspeed_optimizer), ("single", sample_a_text_file),
        ("single", sample_a_plain_state_dict), ("single", sample_top_k_zero), ("single", sample_on_cuda_without_cuda),
    ]
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_changes_nothing(run_copy, tmp_path, case):
    backend, make = BAD_INPUTS[case]
    run = run_copy(backend)
    outside = tmp_path / "outside"
    outside.mkdir()
    args, named = make(run, outside)
    before, outside_before = file_hashes(run), sorted(p.name for p in outside.rglob("*"))
    proc = agdlm(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert named in line and "Traceback" not in line, line
    assert file_hashes(run) == before
    assert sorted(p.name for p in outside.rglob("*")) == outside_before  # no temporary file left behind


def test_file_export_creates_its_missing_folder_and_a_failed_one_leaves_none(run_copy, tmp_path):
    run = run_copy("single")
    out = tmp_path / "absent" / "deeper" / "model.safetensors"
    proc = agdlm("export", run, out)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    (step_folder(run) / "model.pt").unlink()  # the only checkpoint is now incomplete: the export fails
    failed = agdlm("export", run, tmp_path / "other" / "model.safetensors")
    assert failed.returncode == 2 and "model.pt" in one_line(failed.stderr)
    assert not (tmp_path / "other").exists()
