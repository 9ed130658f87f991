"""The built-in demo corpus: the Python standard library's pydoc topics (79 documents of real
English, ~465 KB, on every machine), written once as an OpenWebText2-style `.jsonl.zst`
shard so that the demo reads it through the same reader real data uses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import zstandard

from agdlm.atomic_files import atomic_write_bytes


def cache_dir() -> Path:
    return Path(os.environ.get("AGDLM_CACHE", Path.home() / ".cache" / "agdlm"))


def demo_shard_path() -> Path:
    return cache_dir() / "demo" / "pydoc_topics.jsonl.zst"


def write_demo_shard(path: Path | None = None) -> Path:
    """Write the shard (atomically) unless it already exists."""
    from pydoc_data.topics import topics

    path = Path(path or demo_shard_path())
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"text": text, "meta": {"source": "pydoc_data.topics", "topic": name}})
        for name, text in sorted(topics.items())
    ]
    payload = zstandard.ZstdCompressor(level=10).compress(("\n".join(lines) + "\n").encode("utf-8"))
    atomic_write_bytes(path, payload)
    return path
