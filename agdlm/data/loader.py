"""Build the trainer's data: a source name -> train batches (resumable) and fixed val batches.

`data.source` selects the path:
  - "demo": the pydoc topics shard (written once to the cache dir), read in memory;
  - a prepared token folder (has train_*.bin, from `agdlm prepare`): memmapped uint16
    shards, world-size-invariant global batches;
  - a local file or folder (.jsonl, .jsonl.zst, .parquet, .txt, .tar), or a hub dataset id
    (`segyges/OpenWebText2`, `openwebtext2`, `hub:<id or local hub-layout folder>`).
    `data.mode` decides: "memory" reads and tokenises everything at startup (world-size
    invariant, like the prepared path), "stream" streams each rank's part; "auto" keeps
    local sources up to `MEMORY_LIMIT_BYTES` in memory and streams the rest and the hub.

Every path yields `Data(train, val)`; train has next_batch/state_dict/load_state_dict,
val.batch(k) is fixed. In memory and prepared: split by document hash (or by file);
streaming: held-out documents by hash, val tokens collected at startup from the stream's
head (cached by rank 0 in the cache dir, so the other ranks wait on `barrier` and read it).
Streaming ranks share the training documents by members (whole files / tar members, when
there are at least as many as ranks: each rank decompresses ~1/N) or else by documents
(every rank walks the whole stream); the choice is logged and kept in the data position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agdlm.atomic_files import atomic_write_bytes
from agdlm.data.demo import cache_dir, write_demo_shard
from agdlm.data.packing import (
    StreamingBlocks,
    TokenBatches,
    TokenShards,
    is_validation_document,
    tokenize_documents,
)
from agdlm.data.sources import (
    HUB_PREFIX,
    PREPARED_MARKER,
    SHARE_MEMBERS,
    SOURCE_ALIASES,
    BadRecords,
    DataSourceError,
    DocumentStream,
    choose_share,
    is_prepared_folder,
    resolve_shards,
)
from agdlm.data.tokenizer import encoding_for
from agdlm.config import ConfigError

log = logging.getLogger("agdlm.data")

MEMORY_LIMIT_BYTES = 64 << 20


@dataclass
class Data:
    train: TokenBatches | StreamingBlocks
    val: TokenBatches  # eval reads its first `eval_batches` global batches, in order
    kind: str = "memory"  # memory | prepared | stream
    losses: BadRecords | None = None  # memory: the startup read; prepared: as meta.json recorded them

    def bad_counts(self) -> dict[str, int]:
        """{"data_bad_records": n, "data_bad_members": m} so far, for the metrics. Streaming:
        this rank's reader (every rank sees the damaged members, each only its own records)."""
        if isinstance(self.train, StreamingBlocks):
            return self.train.bad_counts()
        return (self.losses or BadRecords()).counts()


def choose_mode(source: str, mode: str) -> str:
    if source == "demo":
        return "memory"
    if is_prepared_folder(source):
        return "prepared"
    if mode in ("memory", "stream"):
        return mode
    source = SOURCE_ALIASES.get(source, source)
    if source.startswith(HUB_PREFIX) or not os.path.exists(source):
        return "stream"
    path = Path(source)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return "memory" if size <= MEMORY_LIMIT_BYTES else "stream"


def _common(cfg, rank, world_size) -> dict:
    return dict(
        block_size=cfg.model.block_size,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world_size,
    )


def _split_tokens(docs, val_fraction: float, threads: int = 1, tokenizer: str = "gpt2") -> tuple[np.ndarray, np.ndarray]:
    enc = encoding_for(tokenizer)
    train_docs, val_docs = [], []
    for text in docs:
        (val_docs if is_validation_document(text, val_fraction) else train_docs).append(text)
    if not train_docs or not val_docs:  # the stream already refused a source without documents
        raise ConfigError(
            f"data.val_fraction={val_fraction} leaves an empty train or val split "
            f"({len(train_docs)} train, {len(val_docs)} val documents)"
        )
    return tokenize_documents(train_docs, enc, threads), tokenize_documents(val_docs, enc, threads)


def _stream(cfg, source: str, stride: int = 1, offset: int = 0) -> DocumentStream:
    shards = resolve_shards(source, getattr(cfg.data, "split", "train"))
    bad = BadRecords(max_fraction=cfg.data.max_bad_fraction)
    share = choose_share(shards, stride)
    if stride > 1:
        log_share(source, share, stride, offset)
    return DocumentStream(shards, cfg.data.text_column, stride, offset, bad, name=source, share=share)


def log_share(source: str, share: str, ranks: int, rank: int) -> None:
    if rank != 0:
        return
    if share == SHARE_MEMBERS:
        log.info("streaming %s over %d ranks by members: it has at least %d files/tar members; member i goes whole "
                 "to rank i mod %d, so each rank decompresses about 1/%d of it", source, ranks, ranks, ranks, ranks)
    else:
        log.info("streaming %s over %d ranks by documents: fewer files/tar members than ranks; document i goes to "
                 "rank i mod %d, every rank decompresses all of it", source, ranks, ranks)


def build_data(cfg, rank: int = 0, world_size: int = 1, barrier=None) -> Data:
    """cfg is the full Config. `barrier` (if given) is called after rank 0 prepares files."""
    d = cfg.data
    source = d.source
    mode = choose_mode(source, getattr(d, "mode", "auto"))
    common = _common(cfg, rank, world_size)
    threads = max(1, d.num_workers)

    if mode == "prepared":
        return _prepared_data(cfg, source, common)

    if source == "demo":
        if rank == 0:
            write_demo_shard()
        if barrier is not None:
            barrier()
        source = str(write_demo_shard())

    if mode == "memory":
        stream = _stream(cfg, source)
        train_tokens, val_tokens = _split_tokens(stream.texts(), d.val_fraction, threads, d.tokenizer)
        return Data(
            train=TokenBatches(train_tokens, seed=d.seed, shuffle=True, **common),
            val=TokenBatches(val_tokens, seed=d.seed, shuffle=False, **common),
            kind="memory",
            losses=stream.bad,
        )

    # streaming
    val_tokens = _streaming_val_tokens(cfg, source, rank, barrier)
    train = StreamingBlocks(
        _stream(cfg, source, world_size, rank),
        encoding_for(d.tokenizer),
        seed=d.seed,
        shuffle_buffer=d.shuffle_buffer,
        val_fraction=d.val_fraction,
        threads=threads,
        **common,
    )
    return Data(train=train, val=TokenBatches(val_tokens, seed=d.seed, shuffle=False, **common), kind="stream")


def _prepared_data(cfg, folder: str, common: dict) -> Data:
    span = cfg.model.block_size + 1
    meta = read_prepared_meta(Path(folder))
    made_with = meta.get("tokenizer", "gpt2")
    if made_with != cfg.data.tokenizer:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}, but {Path(folder) / PREPARED_MARKER} says the "
                          f"folder was tokenised with {made_with!r}")
    train_files, val_files = (prepared_split_files(Path(folder), meta, split) for split in ("train", "val"))
    if not val_files:
        raise DataSourceError(f"prepared data folder {folder} has no val_*.bin files")
    train, val = TokenShards.from_files(train_files, span), TokenShards.from_files(val_files, span)
    for name, store in (("train", train), ("val", val)):
        if store.num_blocks < 1:
            raise DataSourceError(f"prepared data folder {folder}: the {name} shards hold fewer than block_size+1 = {span} tokens")
    losses = BadRecords()
    losses.records, losses.members = int(meta.get("bad_records", 0)), int(meta.get("bad_members", 0))
    return Data(
        train=TokenBatches(train, seed=cfg.data.seed, shuffle=True, **common),
        val=TokenBatches(val, seed=cfg.data.seed, shuffle=False, **common),
        kind="prepared",
        losses=losses,
    )


def read_prepared_meta(folder: Path) -> dict:
    """meta.json, the mark `agdlm prepare` writes last: without it the folder is unfinished."""
    path = folder / PREPARED_MARKER
    redo = f"run `agdlm prepare SOURCE {folder}` again (it starts an unfinished folder over)"
    if not path.is_file():
        raise DataSourceError(f"prepared data folder {folder} is unfinished: {path} is missing (its `agdlm prepare` "
                              f"was interrupted or failed); {redo}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataSourceError(f"{path} is unreadable ({e}); {redo}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("files"), dict) and isinstance(meta.get("tokens"), dict)):
        raise DataSourceError(f"{path} is not an `agdlm prepare` meta.json (no files/tokens); {redo}")
    return meta


def prepared_split_files(folder: Path, meta: dict, split: str) -> list[Path]:
    """The split's shard files as meta.json lists them, checked against its token count."""
    paths = [folder / name for name in meta["files"].get(split, [])]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataSourceError(f"prepared data folder {folder}: {missing[0]} is missing (listed in {PREPARED_MARKER})")
    tokens = sum(p.stat().st_size for p in paths) // 2
    expected = int(meta["tokens"].get(split, tokens))
    if tokens != expected:
        raise DataSourceError(f"prepared data folder {folder}: the {split} shards hold {tokens} tokens, "
                              f"{PREPARED_MARKER} says {expected} (changed or damaged after `agdlm prepare`)")
    return paths


def collect_val_tokens(stream: DocumentStream, val_fraction: float, need_tokens: int, threads: int = 1,
                       tokenizer: str = "gpt2") -> np.ndarray:
    """The held-out documents from the head of the stream until `need_tokens` tokens."""
    enc = encoding_for(tokenizer)
    parts, have, batch = [], 0, []
    for text in stream.texts():
        if not is_validation_document(text, val_fraction):
            continue
        batch.append(text)
        if len(batch) == 64:
            parts.append(tokenize_documents(batch, enc, threads))
            have, batch = have + len(parts[-1]), []
            if have >= need_tokens:
                break
    if batch:
        parts.append(tokenize_documents(batch, enc, threads))
    tokens = np.concatenate(parts) if parts else np.empty(0, np.uint16)
    return tokens[: max(need_tokens, 0)] if len(tokens) > need_tokens else tokens


def _streaming_val_tokens(cfg, source: str, rank: int, barrier) -> np.ndarray:
    span = cfg.model.block_size + 1
    need = cfg.train.eval_batches * cfg.train.global_batch_size * span
    stamp = None
    if os.path.exists(source):
        files = [Path(source)] if os.path.isfile(source) else sorted(p for p in Path(source).rglob("*") if p.is_file())
        stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = [source, stamp, cfg.data.text_column, cfg.data.val_fraction, need, getattr(cfg.data, "split", "train")]
    if cfg.data.tokenizer != "gpt2":  # gpt2 keeps the key (and the caches) it always had
        key.append(cfg.data.tokenizer)
    key = json.dumps(key)
    path = cache_dir() / "val" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".bin")

    def collect() -> None:
        log.info("collecting %d validation tokens from %s", need, source)
        tokens = collect_val_tokens(_stream(cfg, source), cfg.data.val_fraction, need, max(1, cfg.data.num_workers),
                                    cfg.data.tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, tokens.astype("<u2").tobytes())

    failure = None
    if rank == 0 and not path.is_file():
        try:
            collect()
        except (DataSourceError, ConfigError) as e:  # still reach the barrier: the other ranks wait there
            failure = e
    if barrier is not None:
        barrier()
    if failure:
        raise failure
    if not path.is_file():  # no barrier, or rank 0 stopped: read it here (a bad source stops every rank alike)
        collect()
    tokens = np.fromfile(path, dtype="<u2")
    if len(tokens) < span:
        raise ConfigError(
            f"data source {source}: the held-out split (data.val_fraction={cfg.data.val_fraction}) holds "
            f"{len(tokens)} tokens, fewer than one block of {span}"
        )
    if len(tokens) < need:
        log.warning("validation set of %s holds %d tokens, fewer than the %d that eval asks for: batches repeat",
                    source, len(tokens), need)
    return tokens
