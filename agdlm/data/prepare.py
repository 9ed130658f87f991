"""`agdlm prepare SOURCE OUT`: tokenise a corpus into flat little-endian uint16 token files.

OUT/train_000000.bin, train_000001.bin, ... and val_000000.bin, ...: each document's GPT-2
`encode_ordinary` ids followed by <|endoftext|> (50256), documents in source order; the
split is the same hash split the streaming loader uses (`--val-fraction`). A new shard
starts after `--shard-tokens` tokens. The main process reads and parses documents; worker
processes tokenise batches of them; results are written in order, so the output does not
depend on the number of workers. Files appear under their final names only when complete
(written as .tmp, then renamed), and OUT/meta.json is written last.

Then train with data.source=OUT (memmapped shards, world-size-invariant batches).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from agdlm.data.packing import document_tokens, is_validation_document
from agdlm.data.sources import BadRecords, DataSourceError, DocumentStream, resolve_shards
from agdlm.data.tokenizer import TOKENIZERS, encoding_for

_encoding = None


def _init_worker(tokenizer: str = "gpt2") -> None:
    global _encoding
    _encoding = encoding_for(tokenizer)


def _tokenize(batch: list[tuple[bool, str]]) -> tuple[bytes, bytes, int, int]:
    """(train bytes, val bytes, train docs, val docs) of a batch of (is_val, text)."""
    enc = _encoding or encoding_for("gpt2")
    train, val, n_train, n_val = [], [], 0, 0
    for is_val, text in batch:
        tokens = document_tokens(enc.encode_ordinary(text), enc.eot_token)
        if is_val:
            val.append(tokens)
            n_val += 1
        else:
            train.append(tokens)
            n_train += 1
    join = lambda parts: np.concatenate(parts).astype("<u2").tobytes() if parts else b""  # noqa: E731
    return join(train), join(val), n_train, n_val


class ShardWriter:
    """Writes `<prefix>_NNNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out: Path, prefix: str, shard_tokens: int):
        self.out, self.prefix, self.shard_tokens = out, prefix, shard_tokens
        self.index, self.in_shard, self.tokens, self.file, self.paths = 0, 0, 0, None, []

    def _open(self) -> None:
        final = self.out / f"{self.prefix}_{self.index:06d}.bin"
        self.file = open(final.with_suffix(".bin.tmp"), "wb")
        self.paths.append(final)

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            os.replace(self.paths[-1].with_suffix(".bin.tmp"), self.paths[-1])
            self.file, self.in_shard, self.index = None, 0, self.index + 1

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self.file is None:
                self._open()
            room = (self.shard_tokens - self.in_shard) * 2
            part = view[:room]
            self.file.write(part)
            n = len(part) // 2
            self.in_shard += n
            self.tokens += n
            view = view[len(part):]
            if self.in_shard >= self.shard_tokens:
                self._close()

    def close(self) -> None:
        self._close()


def _batches(stream: DocumentStream, val_fraction: float, batch_docs: int):
    batch = []
    for text in stream.texts():
        batch.append((is_validation_document(text, val_fraction), text))
        if len(batch) == batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(source: str, out: str | Path, *, workers: int | None = None, val_fraction: float = 0.0005,
            text_column: str = "text", shard_tokens: int = 1 << 30, batch_docs: int = 256,
            split: str = "train", progress: bool = True, tokenizer: str = "gpt2") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        raise DataSourceError(f"{out} already holds prepared shards ({old.name}); choose an empty folder")
    workers = workers or os.cpu_count() or 1
    stream = DocumentStream(resolve_shards(source, split), text_column, bad=BadRecords(), name=source)
    train, val = ShardWriter(out, "train", shard_tokens), ShardWriter(out, "val", shard_tokens)
    docs = {"train": 0, "val": 0}
    from tqdm import tqdm

    bar = tqdm(unit="doc", unit_scale=True, desc=f"prepare {source}", disable=not progress, mininterval=1.0)
    start = time.perf_counter()
    batches = _batches(stream, val_fraction, batch_docs)
    if workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
        results = pool.imap(_tokenize, batches, chunksize=1)
    else:
        _init_worker(tokenizer)
        pool, results = None, map(_tokenize, batches)
    try:
        for train_bytes, val_bytes, n_train, n_val in results:
            train.write(train_bytes)
            val.write(val_bytes)
            docs["train"] += n_train
            docs["val"] += n_val
            bar.update(n_train + n_val)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{(train.tokens + val.tokens) / elapsed:,.0f} tokens/s", refresh=False)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    train.close()
    val.close()
    elapsed = time.perf_counter() - start
    total_docs, total_tokens = docs["train"] + docs["val"], train.tokens + val.tokens
    if total_docs == 0:
        raise DataSourceError(f"data source {source} holds no documents")
    meta = {
        "source": source,
        "tokenizer": tokenizer,
        "eot_token": encoding_for(tokenizer).eot_token,
        "dtype": "uint16 little-endian",
        "val_fraction": val_fraction,
        "documents": docs,
        "tokens": {"train": train.tokens, "val": val.tokens},
        "files": {"train": [p.name for p in train.paths], "val": [p.name for p in val.paths]},
        "bad_records": stream.bad.count,
        "seconds": round(elapsed, 3),
        "workers": workers,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"prepared {total_docs:,} documents, {total_tokens:,} tokens ({train.tokens:,} train, {val.tokens:,} val) "
        f"in {elapsed:.1f} s: {total_docs / elapsed:,.0f} docs/s, {total_tokens / elapsed:,.0f} tokens/s "
        f"with {workers} workers; {stream.bad.count} bad records skipped -> {out}"
    )
    if docs["val"] == 0:
        print(f"warning: no document fell in the validation split (--val-fraction {val_fraction}); "
              "training on this folder needs val_*.bin", file=sys.stderr)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agdlm prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="local file or folder (.jsonl, .jsonl.zst, .parquet, .txt, .tar), hub dataset id, or 'demo'")
    p.add_argument("out", help="output folder for train_*.bin / val_*.bin")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.0005, help="held-out fraction by document hash")
    p.add_argument("--text-column", default="text")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--shard-tokens", type=int, default=1 << 30, help="tokens per output file")
    p.add_argument("--batch-docs", type=int, default=256, help="documents per worker task")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2", help="gpt2 (default) or bytes (UTF-8 bytes, for cheap studies)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.shard_tokens < 1:
        p.error(f"--shard-tokens must be at least 1, got {args.shard_tokens}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    source = args.source
    if source == "demo":
        from agdlm.data.demo import write_demo_shard

        source = str(write_demo_shard())
    try:
        prepare(source, args.out, workers=args.workers, val_fraction=args.val_fraction, text_column=args.text_column,
                shard_tokens=args.shard_tokens, batch_docs=args.batch_docs, split=args.split,
                progress=not args.no_progress, tokenizer=args.tokenizer)
    except DataSourceError as e:
        print(f"agdlm prepare: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
