"""Single files written atomically: a temporary file beside the target, renamed into place, so
readers see the old file or the whole new one. A write that fails because the disk is full
raises DiskFullError naming the file, and leaves no temporary file behind. Checkpoints,
manifests, metrics and prepared data all write through here."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

TMP_PREFIX = ".tmp_"
NEARLY_FULL_BYTES = 1 << 20  # torch.save reports a full disk only as an opaque RuntimeError


class DiskFullError(OSError):
    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


def disk_is_full(error: BaseException, path: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:  # a RuntimeError from torch.save's stream writer: look at the disk itself
        return shutil.disk_usage(existing_parent(Path(path))).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def reporting_full_disk(path: Path) -> Iterator[None]:
    """Turn a write that failed for want of space into one DiskFullError naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as e:
        if disk_is_full(e, path):
            raise DiskFullError(path) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a temporary file beside `path`, then rename it into place: readers see the old
    file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with removed_on_failure(tmp), reporting_full_disk(path):  # look at the disk before freeing it
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)  # frees the space a failed write took
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with removed_on_failure(tmp), reporting_full_disk(path):  # look at the disk before freeing it
        torch.save(obj, tmp)
        os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)
