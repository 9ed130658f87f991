"""`agdlm prepare SOURCE OUT`: tokenise a corpus into flat little-endian uint16 token files.

OUT/train_000000.bin, train_000001.bin, ... and val_000000.bin, ...: each document's GPT-2
`encode_ordinary` ids followed by <|endoftext|> (50256), documents in source order; the
split is the same hash split the streaming loader uses (`--val-fraction`). A new shard
starts after `--shard-tokens` tokens. The main process reads and parses documents; worker
processes tokenise batches of them; results are written in order, so the output does not
depend on the number of workers. Files appear under their final names only when complete
(written as .tmp, then renamed), and OUT/meta.json is written last: it marks the folder
finished, and the trainer refuses a folder without it.

OUT: a folder that holds an unfinished preparation (shards, no meta.json: a killed or failed
run) is started over; a finished one is refused unless `--overwrite`. Only the shard files
and meta.json are ever removed, and a failed run removes what it wrote. Past
`--max-bad-fraction` unreadable records or files/tar members, preparation stops.

Then train with data.source=OUT (memmapped shards, world-size-invariant batches).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from agdlm.atomic_files import atomic_write_text
from agdlm.data.packing import document_tokens, is_validation_document
from agdlm.data.sources import (
    PREPARED_MARKER,
    BadRecords,
    DataSourceError,
    DocumentStream,
    is_prepare_meta,
    prepared_files,
    resolve_shards,
)
from agdlm.data.tokenizer import TOKENIZERS, encoding_for

_encoding = None


class PrepareError(RuntimeError):
    """An argument or output folder problem, phrased as one line naming it."""


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
            self.file.flush()
            os.fsync(self.file.fileno())  # meta.json, written after, must never name a file still in the page cache only
            self.file.close()
            os.replace(self.paths[-1].with_suffix(".bin.tmp"), self.paths[-1])
            self.file, self.in_shard, self.index = None, 0, self.index + 1

    def write(self, data: bytes) -> None:
        with naming_write_errors(self.current_path()):
            self._write(data)

    def _write(self, data: bytes) -> None:
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
        with naming_write_errors(self.current_path()):
            self._close()

    def current_path(self) -> Path:
        return self.out / f"{self.prefix}_{self.index:06d}.bin.tmp"

    def remove_written(self) -> None:
        """After a failure: nothing of this run stays behind."""
        if self.file is not None:
            self.file.close()
            self.file = None
        for path in self.paths:
            path.unlink(missing_ok=True)
            path.with_suffix(".bin.tmp").unlink(missing_ok=True)


@contextmanager
def naming_write_errors(path: Path):
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PrepareError(f"no space left on device while writing {path}") from None
        raise PrepareError(f"cannot write {path}: {e.strerror or e}") from None


def _batches(stream: DocumentStream, val_fraction: float, batch_docs: int):
    batch = []
    for text in stream.texts():
        batch.append((is_validation_document(text, val_fraction), text))
        if len(batch) == batch_docs:
            yield batch
            batch = []
    if batch:
        yield batch


def check_arguments(val_fraction: float, workers: int | None, shard_tokens: int, batch_docs: int,
                    max_bad_fraction: float) -> None:
    if not (math.isfinite(val_fraction) and 0.0 <= val_fraction < 1.0):
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not (math.isfinite(max_bad_fraction) and 0.0 <= max_bad_fraction <= 1.0):
        raise PrepareError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")
    if workers is not None and workers < 0:
        raise PrepareError(f"--workers must be at least 1 (or 0: all cores), got {workers}")
    for flag, value in (("--shard-tokens", shard_tokens), ("--batch-docs", batch_docs)):
        if value < 1:
            raise PrepareError(f"{flag} must be at least 1, got {value}")


@contextmanager
def output_folder(out: Path, overwrite: bool):
    """OUT, created if need be, locked against a second `agdlm prepare`, and cleared of an
    unfinished preparation (or, with `overwrite`, a finished one). A failure inside removes
    the folder again if this call created it and it is left empty."""
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise PrepareError(f"the output {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise PrepareError(f"cannot create or open the output folder {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f"another `agdlm prepare` is writing into {out}") from None
        _clear_earlier_preparation(out, overwrite)
        yield out
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        os.close(lock)


def _clear_earlier_preparation(out: Path, overwrite: bool) -> None:
    marker, shards = out / PREPARED_MARKER, prepared_files(out)
    finished = is_prepare_meta(marker)
    if marker.exists() and not finished and not shards:
        raise PrepareError(f"{marker} is not from `agdlm prepare` and would be replaced; choose another folder")
    if finished and not overwrite:
        raise PrepareError(f"{out} already holds a finished preparation ({marker}); choose another folder or "
                           "pass --overwrite")
    if not finished and shards:
        print(f"agdlm prepare: {out} holds an unfinished preparation ({len(shards)} shard files, no complete "
              f"{PREPARED_MARKER}); starting it over", file=sys.stderr)
    with naming_write_errors(out):
        marker.unlink(missing_ok=True)  # first: the folder reads as unfinished from here on
        for path in shards:
            path.unlink()


def prepare(source: str, out: str | Path, *, workers: int | None = None, val_fraction: float = 0.0005,
            text_column: str = "text", shard_tokens: int = 1 << 30, batch_docs: int = 256,
            split: str = "train", progress: bool = True, tokenizer: str = "gpt2", max_bad_fraction: float = 0.01,
            overwrite: bool = False) -> dict:
    check_arguments(val_fraction, workers, shard_tokens, batch_docs, max_bad_fraction)
    bad = BadRecords(max_fraction=max_bad_fraction, limit_name="--max-bad-fraction")
    stream = DocumentStream(resolve_shards(source, split), text_column, bad=bad, name=source)  # before OUT is touched
    with output_folder(Path(out), overwrite) as out:
        return _write_preparation(stream, out, workers or os.cpu_count() or 1, val_fraction, shard_tokens,
                                  batch_docs, progress, tokenizer)


def _write_preparation(stream: DocumentStream, out: Path, workers: int, val_fraction: float, shard_tokens: int,
                       batch_docs: int, progress: bool, tokenizer: str) -> dict:
    source = stream.name
    train, val = ShardWriter(out, "train", shard_tokens), ShardWriter(out, "val", shard_tokens)
    try:
        docs, elapsed = _tokenize_into(stream, train, val, workers, val_fraction, batch_docs, progress, tokenizer)
        train.close()
        val.close()
    except BaseException:
        train.remove_written()
        val.remove_written()
        raise
    total_docs, total_tokens = docs["train"] + docs["val"], train.tokens + val.tokens
    bad = stream.bad
    meta = {
        "source": source,
        "tokenizer": tokenizer,
        "eot_token": encoding_for(tokenizer).eot_token,
        "dtype": "uint16 little-endian",
        "val_fraction": val_fraction,
        "documents": docs,
        "tokens": {"train": train.tokens, "val": val.tokens},
        "files": {"train": [p.name for p in train.paths], "val": [p.name for p in val.paths]},
        "bad_records": bad.records,
        "bad_members": bad.members,
        "first_bad": bad.first_bad() if bad.first else None,
        "seconds": round(elapsed, 3),
        "workers": workers,
    }
    with naming_write_errors(out / PREPARED_MARKER):
        atomic_write_text(out / PREPARED_MARKER, json.dumps(meta, indent=2) + "\n")
    print(
        f"prepared {total_docs:,} documents, {total_tokens:,} tokens ({train.tokens:,} train, {val.tokens:,} val) "
        f"in {elapsed:.1f} s: {total_docs / elapsed:,.0f} docs/s, {total_tokens / elapsed:,.0f} tokens/s "
        f"with {workers} workers; {bad.records} bad records and {bad.members} of {bad.members_seen} files/tar members "
        f"damaged" + (f" (first: {bad.first_bad()})" if bad.first else "") + f" -> {out}"
    )
    if docs["val"] == 0:
        print(f"warning: no document fell in the validation split (--val-fraction {val_fraction}); "
              "training on this folder needs val_*.bin", file=sys.stderr)
    return meta


def _tokenize_into(stream, train: ShardWriter, val: ShardWriter, workers: int, val_fraction: float,
                   batch_docs: int, progress: bool, tokenizer: str) -> tuple[dict, float]:
    docs = {"train": 0, "val": 0}
    from tqdm import tqdm

    bar = tqdm(unit="doc", unit_scale=True, desc=f"prepare {stream.name}", disable=not progress, mininterval=1.0)
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
    if docs["train"] + docs["val"] == 0:  # the stream names a source without readable documents first
        raise DataSourceError(f"data source {stream.name} holds no documents")
    return docs, max(time.perf_counter() - start, 1e-9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agdlm prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="local file or folder (.jsonl, .jsonl.zst, .parquet, .txt, .tar), hub dataset id, or 'demo'")
    p.add_argument("out", help="output folder for train_*.bin / val_*.bin")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default or 0: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.0005, help="held-out fraction by document hash, in [0, 1)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--split", default="train", help="split of a hub dataset")
    p.add_argument("--shard-tokens", type=int, default=1 << 30, help="tokens per output file")
    p.add_argument("--batch-docs", type=int, default=256, help="documents per worker task")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2", help="gpt2 (default) or bytes (UTF-8 bytes, for cheap studies)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop past this fraction of unreadable records or files/tar members (like data.max_bad_fraction)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished preparation in OUT")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    source = args.source
    try:
        check_arguments(args.val_fraction, args.workers, args.shard_tokens, args.batch_docs, args.max_bad_fraction)
        if source == "demo":
            from agdlm.data.demo import write_demo_shard

            source = str(write_demo_shard())
        prepare(source, args.out, workers=args.workers, val_fraction=args.val_fraction, text_column=args.text_column,
                shard_tokens=args.shard_tokens, batch_docs=args.batch_docs, split=args.split,
                progress=not args.no_progress, tokenizer=args.tokenizer, max_bad_fraction=args.max_bad_fraction,
                overwrite=args.overwrite)
    except (DataSourceError, PrepareError) as e:
        print(f"agdlm prepare: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
