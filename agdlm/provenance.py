"""What produced a run: git commit, package versions, world size, seeds, command line."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("agdlm", "torch", "tiktoken", "datasets", "wandb", "deepspeed", "zstandard", "numpy")


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the agdlm checkout (or of `cwd`), with '+dirty' for local changes."""
    where = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect(*, world_size: int, seeds: dict, command_line: list[str] | None = None, device: str = "cpu") -> dict:
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "world_size": world_size,
        "device": device,
        "seeds": seeds,
        "command_line": list(command_line if command_line is not None else sys.argv),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
