"""Run-directory checkpoints: `checkpoints/step_<N>/` folders written atomically, a `latest`
pointer written last, and only the newest `keep` folders kept.

A folder is filled under a temporary name and renamed into place only when complete, and
`latest` is replaced by rename, so a write that dies halfway leaves the previous checkpoint
loadable. Whatever a backend writes inside the folder is its own business."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

TMP_PREFIX = ".tmp_"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path`, then rename it into place: readers see the old
    file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    steps = sorted(
        (int(p.name.split("_", 1)[1]) for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")),
    )
    for old in steps[:-keep] if keep > 0 else []:
        if old != step:
            shutil.rmtree(root / step_dir_name(old), ignore_errors=True)
    return final


def write_checkpoint(run_dir: Path, step: int, keep: int, fill: Callable[[Path], None]) -> Path:
    """Single-writer convenience: begin, let `fill(folder)` write the files, commit."""
    folder = begin_checkpoint(run_dir, step)
    fill(folder)
    return commit_checkpoint(run_dir, step, keep)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)
