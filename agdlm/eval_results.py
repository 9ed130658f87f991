"""eval.json: what `agdlm eval` found, next to the model it scored (in a run or HF folder;
<file>.eval.json beside an exported file), read back by `agdlm report`.

    {"loss": {SOURCE: {"val_loss", "perplexity", "blocks", "tokens", "step", ...}},
     "choice": {FILE: {"acc_norm", "acc", "items", "predictions", "step", ...}}}

No torch here: the report reads it without loading models."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_FILE = "eval.json"


def results_path(model_path: Path) -> Path:
    model_path = Path(model_path)
    return model_path / RESULTS_FILE if model_path.is_dir() else model_path.with_name(model_path.name + ".eval.json")


def record_results(path: Path, kind: str, key: str, result: dict) -> None:
    """Add one result under {kind: {key: result}}, keeping the others."""
    from agdlm.atomic_files import atomic_write_text

    results = read_results_file(path)
    results.setdefault(kind, {})[key] = result
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def read_results_file(path: Path) -> dict:
    """{} when absent or unreadable (a damaged file is replaced rather than blocking a new result)."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) and all(isinstance(v, dict) for v in results.values()) else {}


def read_results(folder: Path) -> dict:
    return read_results_file(Path(folder) / RESULTS_FILE)


def headline_values(results: dict) -> dict[str, float]:
    """One number per result, named for a table column: `eval loss <source>` (val loss) and
    `<file stem> acc_norm`."""
    values = {}
    for key, result in results.get("loss", {}).items():
        if isinstance(result, dict) and isinstance(result.get("val_loss"), (int, float)):
            values[f"eval loss {Path(key).name or key}"] = float(result["val_loss"])
    for key, result in results.get("choice", {}).items():
        if isinstance(result, dict) and isinstance(result.get("acc_norm"), (int, float)):
            values[f"{Path(key).stem} acc_norm"] = float(result["acc_norm"])
    return values
