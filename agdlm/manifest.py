"""Checkpoint manifests: every file of a checkpoint folder with its size and a fast checksum,
written last, so a resume, `agdlm sample` and `agdlm export` tell a whole checkpoint from one
with a cut, changed or missing file before loading anything from it. It covers whatever the
backend wrote (model.pt, DCP shards and .metadata, DeepSpeed's files) and the trainer's own
(optimizer, RNG, data position, trainer.json).

    manifest.json   {"format": "agdlm-checkpoint-manifest/1", "checksum": "xxh3_128",
                     "files": {"model.pt": {"bytes": 6512345, "xxh3_128": "9f0c..."}, ...}}

XXH3-128 (xxhash, which `datasets` already needs): not a cryptographic hash. The manifest
guards against damage, not against someone who rewrites the folder and its manifest; reading
such a folder safely is agdlm.parallel.safe_load's job. It hashes at several GB/s per core, so
the check costs about what reading the files costs. With several ranks the work is shared:
each rank hashes, and later verifies, its part of the bytes (`shares`). The functions here
know nothing of ranks beyond that split."""

from __future__ import annotations

import json
from pathlib import Path

from agdlm.atomic_files import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "agdlm-checkpoint-manifest/1"
CHECKSUM = "xxh3_128"
READ_CHUNK = 8 << 20


def checksum(path: Path) -> str:
    import xxhash

    state = xxhash.xxh3_128()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            state.update(view[:n])
    return state.hexdigest()


def checkpoint_files(folder: Path) -> dict[str, int]:
    """{relative path: bytes} of every file under `folder` but the manifest, sorted by path."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    files.pop(MANIFEST, None)
    return dict(sorted(files.items()))


def shares(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """The files split into `world_size` lists of about equal bytes (largest first, each to the
    lightest list so far); the same split on every rank for the same sizes."""
    loads = [0] * world_size
    split: list[list[str]] = [[] for _ in range(world_size)]
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        lightest = loads.index(min(loads))
        split[lightest].append(name)
        loads[lightest] += size
    return [sorted(names) for names in split]


def describe(folder: Path, names: list[str]) -> dict[str, dict]:
    """The manifest entries of `names` (paths relative to `folder`)."""
    entries = {}
    for name in names:
        path = Path(folder) / name
        entries[name] = {"bytes": path.stat().st_size, CHECKSUM: checksum(path)}
    return entries


def manifest_text(entries: dict[str, dict]) -> str:
    return json.dumps({"format": FORMAT, "checksum": CHECKSUM, "files": dict(sorted(entries.items()))}, indent=1) + "\n"


def seal(folder: Path) -> None:
    """Write the manifest of everything in `folder` on one process (atomically, last)."""
    atomic_write_text(Path(folder) / MANIFEST, manifest_text(describe(folder, list(checkpoint_files(folder)))))


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(its file entries, None), (None, None) when there is no manifest, or (None, the problem)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None, None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{path} is not valid JSON ({str(e).splitlines()[0][:120]})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("checksum") != CHECKSUM
            or not all(_entry_ok(name, entry) for name, entry in files.items())):
        return None, f"{path} is not an agdlm checkpoint manifest ({FORMAT} with {CHECKSUM} checksums)"
    return files, None


def _entry_ok(name, entry) -> bool:
    parts = Path(name).parts if isinstance(name, str) else ()
    return (bool(parts) and ".." not in parts and not Path(name).is_absolute() and isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int) and isinstance(entry.get(CHECKSUM), str))


def manifest_problem(folder: Path, rank: int = 0, world_size: int = 1, required: bool = False) -> str | None:
    """The first file of this rank's share that does not match the manifest ("PATH: why"),
    a damaged manifest, or a missing one when `required`; None when all match or, for a
    checkpoint written before manifests existed, when there is none."""
    folder = Path(folder)
    files, problem = read_manifest(folder)
    if problem:
        return problem
    if files is None:
        return f"{folder / MANIFEST} is missing" if required else None
    mine = shares({name: entry["bytes"] for name, entry in files.items()}, world_size)[rank]
    for name in mine:
        problem = file_mismatch(folder / name, files[name])
        if problem:
            return problem
    return None


def file_mismatch(path: Path, entry: dict) -> str | None:
    if not path.is_file():
        return f"{path} is missing (listed in its {MANIFEST})"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path} holds {size} bytes, its {MANIFEST} says {entry['bytes']} (cut short or overwritten)"
    try:
        if checksum(path) != entry[CHECKSUM]:
            return f"{path} does not match its {MANIFEST} ({CHECKSUM} differs: the bytes changed)"
    except OSError as e:
        return f"{path} is unreadable ({e.strerror or e})"
    return None
