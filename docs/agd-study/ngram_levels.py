"""Val cross-entropy (nats per token) of n-gram models fitted on a prepared corpus's train split:
the plateaus a small LM's val loss passes through. `python docs/agd-study/ngram_levels.py
[data/pydocs/bytes]` prints n = 1..4 (add-0.01 smoothing; the byte corpus: 3.387, 2.634, 1.990,
1.547). Reads the uint16 train_*/val_* shards `agdlm prepare` writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ALPHA = 0.01


def tokens(folder: Path, split: str) -> np.ndarray:
    files = sorted(folder.glob(f"{split}_*.bin"))
    return np.concatenate([np.fromfile(f, dtype="<u2") for f in files]).astype(np.int64)


def keys(t: np.ndarray, n: int, vocab: int) -> np.ndarray:
    """Each n-gram as one integer, base `vocab`."""
    k = np.zeros(len(t) - n + 1, dtype=np.int64)
    for i in range(n):
        k = k * vocab + t[i:len(t) - n + 1 + i]
    return k


def counts_of(table: tuple[np.ndarray, np.ndarray], wanted: np.ndarray) -> np.ndarray:
    values, counts = table
    at = np.clip(np.searchsorted(values, wanted), 0, len(values) - 1)
    return np.where(values[at] == wanted, counts[at], 0)


def cross_entropy(train: np.ndarray, val: np.ndarray, n: int, vocab: int) -> float:
    grams, val_grams = keys(train, n, vocab), keys(val, n, vocab)
    num = counts_of(np.unique(grams, return_counts=True), val_grams) + ALPHA
    den = counts_of(np.unique(grams // vocab, return_counts=True), val_grams // vocab) + ALPHA * vocab
    return float(-np.log(num / den).mean())


def main(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    train, val = tokens(folder, "train"), tokens(folder, "val")
    vocab = int(max(train.max(), val.max(), meta.get("eot_token", 0))) + 1
    for n in range(1, 5):
        if vocab ** n >= 2 ** 62:
            break  # the n-gram no longer fits one int64 key (a GPT-2 vocabulary past n = 3)
        print(f"{n}-gram: {cross_entropy(train, val, n, vocab):.3f} nats per token")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/pydocs/bytes"))
