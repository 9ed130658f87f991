"""Run-directory checkpoints: `checkpoints/step_<N>/` folders written atomically, a `latest`
pointer written last, and only the newest `keep` folders kept.

A folder is filled under a temporary name and renamed into place only when complete, and
`latest` is replaced by rename, so a write that dies halfway leaves the previous checkpoint
loadable. Whatever a backend writes inside the folder is its own business; what a resume
needs from it (`checkpoint_problem`) is checked here, before anything is loaded.

Each folder's manifest.json (agdlm.manifest), written last, lists its files with sizes and
checksums: `checkpoint_problem` (a resume) and `readable_checkpoint` (sample, export, eval)
find a cut, changed or missing file before anything is loaded. Folders written before
manifests existed have none and are checked as before.

Single files (the `latest` pointer, JSON) are written through agdlm.atomic_files, which also
turns a full disk into one DiskFullError naming the file."""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from agdlm.atomic_files import TMP_PREFIX, atomic_write_text, read_json
from agdlm.manifest import MANIFEST, manifest_problem, seal

CORRUPT_PREFIX = "corrupt_"  # a checkpoint set aside: never pruned, never resumed from
STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None for a fresh run."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = checkpoints_dir(run_dir) / name
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {name!r}, which does not exist; the run directory is damaged")
    return path


def step_folders(run_dir: Path) -> list[Path]:
    """Every committed `step_<N>/` folder, newest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def step_of(folder: Path) -> int:
    return int(STEP_DIR.fullmatch(folder.name).group(1))


def resume_candidates(run_dir: Path) -> tuple[list[Path], str | None]:
    """The checkpoint folders a resume may use, in the order to try them: the one `latest`
    names, then older ones. Without a usable `latest` pointer (lost, or naming a folder that
    is gone) every step folder, newest first, and a warning saying so."""
    folders = step_folders(run_dir)
    pointer = checkpoints_dir(run_dir) / "latest"
    if not folders:
        return [], None
    name = pointer.read_text().strip() if pointer.is_file() else None
    named = checkpoints_dir(run_dir) / name if name and STEP_DIR.fullmatch(name) else None
    if named is not None and named.is_dir():
        return [p for p in folders if step_of(p) <= step_of(named)], None
    problem = "is missing" if name is None else f"names {name!r}, which is not a checkpoint folder"
    return folders, f"{pointer} {problem}; looking for the newest complete checkpoint among {len(folders)} step folders"


def checkpoint_problem(folder: Path, layout: str, rank: int, world_size: int) -> str | None:
    """The first thing wrong with `folder` for a resume on `rank` of `world_size`: a file of
    this rank's share of the manifest that does not match it, or a file the layout needs that
    is missing, empty, truncated or unreadable ("PATH: reason"); None when every such file is
    present and loads. Reads nothing a backend would unpickle as code: torch files of the
    plain layout load with weights_only, others are checked as archives."""
    problem = manifest_problem(folder, rank, world_size)
    if problem:
        return problem
    trainer = folder / "trainer.json"
    state, problem = json_object_problem(trainer, required=("step", "world_size"))
    if problem:
        return problem
    if state.get("manifest") and not (folder / MANIFEST).is_file():  # written with one: it was lost
        return f"{folder / MANIFEST} is missing"
    problem = json_object_problem(folder / "data.json")[1]
    if problem:
        return problem
    for path, check in layout_files(folder, layout):
        problem = file_problem(path, check)
        if problem:
            return problem
    if state["world_size"] == world_size:  # the RNG state is restored only on the same world size
        return file_problem(folder / f"rng_rank{rank}.pt", "torch")
    return None


class NoReadableCheckpoint(Exception):
    """No checkpoint of a run folder is whole; the message names each one's problem."""


def readable_checkpoint(run_dir: Path) -> tuple[Path, list[str]]:
    """For the commands that only read a run (sample, export, eval): the newest checkpoint whose
    trainer.json reads and whose files match its manifest, and one warning for each newer one
    passed over. Nothing is renamed: the folder may belong to a run still training, and only
    its trainer moves a bad checkpoint aside (at its next resume)."""
    candidates, pointer_warning = resume_candidates(run_dir)
    if not candidates:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    passed_over: list[tuple[Path, str]] = []
    for folder in candidates:
        problem = read_problem(folder)
        if problem is None:
            warnings = [pointer_warning] if pointer_warning else []
            return folder, warnings + [f"checkpoint {bad.name} is unusable ({why}); using {folder.name}"
                                       for bad, why in passed_over]
        passed_over.append((folder, problem))
    if len(passed_over) == 1:
        raise NoReadableCheckpoint(passed_over[0][1])
    raise NoReadableCheckpoint(f"no checkpoint of {run_dir} is whole: " + "; ".join(why for _, why in passed_over))


def read_problem(folder: Path) -> str | None:
    """What makes `folder` unreadable for sample or export: a damaged trainer.json, or a file that
    does not match the manifest (or a lost manifest)."""
    problem = manifest_problem(folder)
    if problem:
        return problem
    state, problem = json_object_problem(folder / "trainer.json", required=("step",))
    if problem:
        return problem
    if state.get("manifest") and not (folder / MANIFEST).is_file():
        return f"{folder / MANIFEST} is missing"
    return None


def layout_files(folder: Path, layout: str) -> list[tuple[Path, str]]:
    """(path, how to check it) for what a backend's load reads, by checkpoint layout."""
    if layout == "model.pt":
        optional = [folder / "scaler.pt"] if (folder / "scaler.pt").exists() else []  # fp16 only
        return [(p, "torch") for p in [folder / "model.pt", folder / "optimizer.pt", *optional]]
    sub = folder / layout
    if layout == "dcp":
        shards = sorted(sub.glob("*.distcp")) or [sub / "__0_0.distcp"]
        plain = [(p, "torch") for p in sorted(folder.glob("*.pt")) if not p.name.startswith("rng_rank")]
        return [(sub / ".metadata", "nonempty")] + [(p, "nonempty") for p in shards] + plain
    if layout == "deepspeed":
        return [(sub / "mp_rank_00_model_states.pt", "archive")] + [
            (p, "archive") for p in sorted(sub.glob("*.pt")) if p.name != "mp_rank_00_model_states.pt"]
    raise ValueError(f"unknown checkpoint layout {layout!r}")


def file_problem(path: Path, check: str) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size == 0:
        return f"{path} is empty"
    try:
        if check == "torch":
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        elif check == "archive":  # torch's zip format; a cut file has lost its directory
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
    except Exception as e:  # noqa: BLE001 - any reason a file does not load makes it unusable
        return f"{path} does not load ({first_line(e)})"
    return None


def json_object_problem(path: Path, required: tuple[str, ...] = ()) -> tuple[dict | None, str | None]:
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        obj = read_json(path)
    except (ValueError, OSError) as e:
        return None, f"{path} is not valid JSON ({first_line(e)})"
    if not isinstance(obj, dict) or any(not isinstance(obj.get(k), int) for k in required):
        return None, f"{path} lacks {', '.join(required) or 'a JSON object'}"
    return obj, None


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint that does not load to `corrupt_step_<N>` (numbered if taken):
    kept for inspection, but neither pruned nor resumed from again."""
    target = folder.with_name(CORRUPT_PREFIX + folder.name)
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{CORRUPT_PREFIX}{folder.name}.{n}")
    os.replace(folder, target)
    return target


def point_latest_at(folder: Path) -> None:
    atomic_write_text(folder.parent / "latest", folder.name + "\n")


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh temporary folder for step `step` (removing leftovers of an interrupted write)."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(run_dir: Path, step: int, keep: int) -> Path:
    """Move the temporary folder into place, point `latest` at it, prune old folders."""
    root = checkpoints_dir(run_dir)
    tmp, final = root / f"{TMP_PREFIX}{step_dir_name(step)}", root / step_dir_name(step)
    if final.exists():  # re-saving a step (e.g. resumed at the end): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    steps = sorted(step_of(p) for p in step_folders(run_dir))
    for old in steps[:-keep] if keep > 0 else []:
        if old != step:
            shutil.rmtree(root / step_dir_name(old), ignore_errors=True)
    return final


def write_checkpoint(run_dir: Path, step: int, keep: int, fill: Callable[[Path], None]) -> Path:
    """Single-writer convenience: begin, let `fill(folder)` write the files, seal, commit."""
    folder = begin_checkpoint(run_dir, step)
    fill(folder)
    seal(folder)
    return commit_checkpoint(run_dir, step, keep)
