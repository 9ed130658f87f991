"""Document sources: each yields documents as text.

OpenWebText2 lines are {"text": ..., "meta": {...}}; `text` may be a list of paragraphs,
joined here with blank lines."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import zstandard


def document_text(record: dict, text_column: str = "text") -> str | None:
    text = record.get(text_column)
    if isinstance(text, list):
        text = "\n\n".join(str(p) for p in text)
    return text if isinstance(text, str) else None


def read_jsonl(path: str | Path, text_column: str = "text") -> Iterator[str]:
    """Documents of a `.jsonl` or `.jsonl.zst` file, in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data source not found: {path}")
    with open(path, "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw) if path.suffix == ".zst" else raw
        for line in io.TextIOWrapper(stream, encoding="utf-8"):
            if line.strip():
                text = document_text(json.loads(line), text_column)
                if text:
                    yield text
