"""Documents -> GPT-2 tokens with <|endoftext|> after each -> fixed blocks of block_size+1
-> (x, y).

Two ways to serve blocks:
  - `TokenBatches`: blocks of a token store (an in-memory array, or memmapped uint16 shards
    from `agdlm prepare`), chosen by a global sampler that decides global batch k whatever
    the number of ranks; rank r takes its rows. Position = global batches consumed, so a run
    resumes on any number of ranks and sees the same data.
  - `StreamingBlocks`: each rank reads its own disjoint part of a document stream (whole
    members or strided documents, `DocumentStream.share`),
    tokenises in batches and packs blocks; a shuffle buffer of `shuffle_buffer` blocks is
    permuted with a seed of (seed, rank, chunk number). Position = where the current chunk
    started (epoch, reader cursor, token offset in that document), the chunk number and the
    blocks already served from it: a resume rebuilds that chunk and continues exactly. The
    position is per rank, so a streaming resume needs the same world size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch

from agdlm.config import ConfigError
from agdlm.data.sources import SHARE_DOCUMENTS, Cursor, DataSourceError, DocumentStream
from agdlm.data.tokenizer import EOT_TOKEN


def is_validation_document(text: str, val_fraction: float) -> bool:
    """Deterministic train/val split by a hash of the document's text."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (h / 2**64) < val_fraction


def document_tokens(ids: list[int], eot: int = EOT_TOKEN) -> np.ndarray:
    """One document's ids followed by <|endoftext|>, as uint16."""
    out = np.empty(len(ids) + 1, dtype=np.uint16)
    out[:-1] = ids
    out[-1] = eot
    return out


def encode_batch(encoding, texts: list[str], threads: int = 1) -> list[list[int]]:
    if threads > 1:
        return encoding.encode_ordinary_batch(texts, num_threads=threads)
    return [encoding.encode_ordinary(t) for t in texts]


def tokenize_documents(docs, encoding, threads: int = 1) -> np.ndarray:
    """Concatenate each document's tokens followed by <|endoftext|>, as uint16."""
    parts = [document_tokens(ids, encoding.eot_token) for ids in encode_batch(encoding, list(docs), threads)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)


# ---- token stores --------------------------------------------------------------------------


class TokenShards:
    """Flat token arrays (in memory, or uint16 memmaps) addressed as one list of blocks: block
    i of shard s is tokens [i*span, (i+1)*span) of that shard; a shard's tail is unused."""

    def __init__(self, arrays: list[np.ndarray], span: int, names: list[str] | None = None):
        self.arrays = [a for a in arrays if len(a) >= span]
        self.span = span
        counts = [len(a) // span for a in self.arrays]
        self.starts = np.cumsum([0] + counts)
        self.num_blocks = int(self.starts[-1])
        self.names = names

    @classmethod
    def from_files(cls, paths, span: int) -> "TokenShards":
        arrays = [np.memmap(p, dtype="<u2", mode="r") for p in paths if _size(p) > 0]
        return cls(arrays, span, [str(p) for p in paths])

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def rows(self, block_ids: np.ndarray) -> np.ndarray:
        """(len(block_ids), span) rows, in the store's dtype (uint16)."""
        block_ids = np.asarray(block_ids, dtype=np.int64)
        shard = np.searchsorted(self.starts, block_ids, side="right") - 1
        local = (block_ids - self.starts[shard]) * self.span
        dtype = self.arrays[0].dtype if self.arrays else np.uint16
        out = np.empty((len(block_ids), self.span), dtype=dtype)
        span = self.span
        for j, (s, start) in enumerate(zip(shard.tolist(), local.tolist())):
            out[j] = self.arrays[s][start : start + span]
        return out


def _size(path) -> int:
    import os

    return os.path.getsize(path)


class GlobalBlockSampler:
    """Decides global batch k as a list of block indices, whatever the world size.

    Each epoch visits every block once in an order seeded by (seed, epoch). Global batch k is
    entries [k*B, (k+1)*B) of the concatenated epoch orders; rank r takes its contiguous
    slice of those rows. The position is just k."""

    def __init__(self, num_blocks: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if num_blocks < 1:
            raise ValueError("the token data holds fewer tokens than one block (block_size + 1)")
        self.num_blocks, self.global_batch_size, self.seed, self.shuffle = num_blocks, global_batch_size, seed, shuffle
        self._epoch_cache: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
            else:
                order = np.arange(self.num_blocks)
            self._epoch_cache = {epoch: order}  # keep one epoch: memory stays O(blocks)
        return self._epoch_cache[epoch]

    def global_batch(self, k: int) -> np.ndarray:
        positions = np.arange(k * self.global_batch_size, (k + 1) * self.global_batch_size, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_blocks)
        out = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self._epoch_order(epoch)[within[mask]]
        return out


def blocks_to_xy(tokens, block_ids: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    store = tokens if isinstance(tokens, TokenShards) else TokenShards([tokens], block_size + 1)
    return rows_to_xy(store.rows(block_ids))


def rows_to_xy(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, block_size+1) token rows -> contiguous int64 x = rows[:, :-1], y = rows[:, 1:].
    One numpy cast-and-copy each (single-threaded: torch's multi-threaded copy stalls when
    the other cores are busy, e.g. with the training process's own threads)."""
    x = rows[:, :-1].astype(np.int64, order="C")
    y = rows[:, 1:].astype(np.int64, order="C")
    return torch.from_numpy(x), torch.from_numpy(y)


def _micro_batches(x, y, micro_batch_size):
    return list(zip(x.split(micro_batch_size), y.split(micro_batch_size)))


def _check_batch(global_batch_size: int, micro_batch_size: int, world_size: int) -> None:
    if global_batch_size % (micro_batch_size * world_size) != 0:
        raise ValueError(
            f"global batch size {global_batch_size} must divide into micro-batches of {micro_batch_size} "
            f"over {world_size} ranks"
        )


class TokenBatches:
    """This rank's micro-batches of each global batch, cut from a token store."""

    def __init__(
        self,
        tokens,
        *,
        block_size: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        _check_batch(global_batch_size, micro_batch_size, world_size)
        self.store = tokens if isinstance(tokens, TokenShards) else TokenShards([tokens], block_size + 1)
        self.block_size = block_size
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.rows_per_rank = global_batch_size // world_size
        self.sampler = GlobalBlockSampler(self.store.num_blocks, global_batch_size, seed, shuffle)
        self.batches_consumed = 0

    def batch(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = self.sampler.global_batch(k)[self.rank * self.rows_per_rank : (self.rank + 1) * self.rows_per_rank]
        x, y = rows_to_xy(self.store.rows(ids))
        return _micro_batches(x, y, self.micro_batch_size)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = self.batch(self.batches_consumed)
        self.batches_consumed += 1
        return out

    def state_dict(self) -> dict:
        return {
            "kind": "blocks",
            "batches_consumed": self.batches_consumed,
            "seed": self.sampler.seed,
            "num_blocks": self.store.num_blocks,
            "global_batch_size": self.sampler.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "blocks":
            raise ValueError(
                f"data position of kind {state.get('kind')!r} cannot resume a block-sampled loader "
                "(the checkpoint was written by a different data source)"
            )
        for key, mine in (("num_blocks", self.store.num_blocks), ("global_batch_size", self.sampler.global_batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"data position was saved with {key}={state[key]}, this loader has {key}={mine}: "
                                 "not the same data, cannot resume exactly")
        self.batches_consumed = int(state["batches_consumed"])


# ---- streaming -------------------------------------------------------------------------------


class StreamingBlocks:
    """This rank's micro-batches from its part of a document stream, resumable exactly."""

    def __init__(
        self,
        stream: DocumentStream,
        encoding,
        *,
        block_size: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1024,
        val_fraction: float = 0.0,
        threads: int = 1,
        doc_batch: int = 64,
    ):
        _check_batch(global_batch_size, micro_batch_size, world_size)
        if stream.stride != world_size or stream.offset != rank:
            raise ValueError("the stream must be this rank's part: stride = world size, offset = rank")
        self.stream, self.encoding = stream, encoding
        self.block_size, self.span = block_size, block_size + 1
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rows_per_rank = global_batch_size // world_size
        self.shuffle_buffer = shuffle_buffer
        self.chunk_blocks = max(1, shuffle_buffer)
        self.val_fraction, self.threads, self.doc_batch = val_fraction, max(1, threads), doc_batch
        self._restart(epoch=0, cursor=Cursor(), token_offset=0, chunk_index=0, blocks_emitted=0)

    # position
    def _restart(self, *, epoch, cursor, token_offset, chunk_index, blocks_emitted) -> None:
        self._chunk_start = (int(epoch), Cursor(*cursor), int(token_offset))
        self._chunk_index = int(chunk_index)
        self._emitted = int(blocks_emitted)
        self._chunks = self._chunk_iter(*self._chunk_start)
        self._chunk = None  # (blocks, order, next_start), built lazily
        self.batches_consumed = getattr(self, "batches_consumed", 0)

    @property
    def epoch(self) -> int:
        return self._chunk_start[0]

    @property
    def bad_records(self) -> int:
        return self.stream.bad.count

    def bad_counts(self) -> dict[str, int]:
        return self.stream.bad.counts()

    # documents -> tokens -> chunks of blocks
    def _train_documents(self, epoch: int, cursor: Cursor) -> Iterator[tuple[int, Cursor, str]]:
        while True:
            from_start, found, held_out = cursor == Cursor(), False, 0
            for cur, text in self.stream.iter_from(cursor):
                if self.val_fraction > 0 and is_validation_document(text, self.val_fraction):
                    held_out += 1
                    continue
                found = True
                yield epoch, cur, text
            if from_start and not found:
                self._no_training_documents(held_out)
            epoch, cursor = epoch + 1, Cursor()

    def _no_training_documents(self, held_out: int) -> None:
        reader = f"rank {self.rank} of {self.world_size}" if self.world_size > 1 else "the reader"
        if held_out:
            raise ConfigError(
                f"data.val_fraction={self.val_fraction} holds out every document {reader} gets from "
                f"{self.stream.name} ({held_out} documents): none is left to train on; lower data.val_fraction"
            )
        raise DataSourceError(f"data source {self.stream.name}: {reader} gets no documents (too few documents "
                              "for this many ranks)")

    def _tokenized(self, epoch: int, cursor: Cursor) -> Iterator[tuple[int, Cursor, np.ndarray]]:
        docs = self._train_documents(epoch, cursor)
        while True:
            batch = list(islice(docs, self.doc_batch))
            ids = encode_batch(self.encoding, [text for _, _, text in batch], self.threads)
            for (ep, cur, _), doc_ids in zip(batch, ids):
                yield ep, cur, document_tokens(doc_ids, self.encoding.eot_token)

    def _chunk_iter(self, epoch: int, cursor: Cursor, token_offset: int):
        """Chunks of `chunk_blocks` blocks, each with where the next chunk starts."""
        need = self.chunk_blocks * self.span
        parts, have, first = [], 0, True
        for ep, cur, tokens in self._tokenized(epoch, cursor):
            pos = token_offset if first else 0
            first = False
            while pos < len(tokens):
                take = min(need - have, len(tokens) - pos)
                parts.append(tokens[pos : pos + take])
                have, pos = have + take, pos + take
                if have == need:
                    yield np.concatenate(parts).reshape(self.chunk_blocks, self.span), (ep, cur, pos)
                    parts, have = [], 0

    def _load_chunk(self) -> None:
        blocks, next_start = next(self._chunks)
        if self.chunk_blocks > 1:
            order = np.random.default_rng([self.seed, self.rank, self.world_size, self._chunk_index]).permutation(
                self.chunk_blocks
            )
        else:
            order = np.arange(1)
        self._chunk = (blocks, order, next_start)

    def next_rows(self, n: int) -> np.ndarray:
        """The next n blocks of this rank, (n, block_size+1) uint16."""
        out = []
        while n > 0:
            if self._chunk is None:
                self._load_chunk()
            blocks, order, next_start = self._chunk
            if self._emitted == len(order):
                self._chunk_start, self._chunk_index, self._emitted, self._chunk = next_start, self._chunk_index + 1, 0, None
                continue
            take = min(n, len(order) - self._emitted)
            out.append(blocks[order[self._emitted : self._emitted + take]])
            self._emitted += take
            n -= take
        return np.concatenate(out)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = rows_to_xy(self.next_rows(self.rows_per_rank))
        self.batches_consumed += 1
        return _micro_batches(x, y, self.micro_batch_size)

    def state_dict(self) -> dict:
        epoch, cursor, token_offset = self._chunk_start
        return {
            "kind": "stream",
            "source": self.stream.name,
            "world_size": self.world_size,
            "share": self.stream.share,
            "block_size": self.block_size,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            "batches_consumed": self.batches_consumed,
            "ranks": {
                str(self.rank): {
                    "epoch": epoch,
                    "cursor": list(cursor),
                    "token_offset": token_offset,
                    "chunk_index": self._chunk_index,
                    "blocks_emitted": self._emitted,
                    "bad_records": self.bad_records,
                    "losses": self.stream.bad.state_dict(),
                }
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise ValueError(
                f"data position of kind {state.get('kind')!r} cannot resume a streaming loader "
                "(the checkpoint was written by a different data source)"
            )
        if int(state["world_size"]) != self.world_size:
            raise ValueError(
                f"cannot resume a streaming data position saved with world size {state['world_size']} on "
                f"{self.world_size} ranks: each rank reads its own part of the stream. Resume with "
                f"{state['world_size']} ranks, or pre-tokenise the data (`agdlm prepare SOURCE OUT`, then "
                "data.source=OUT), whose position does not depend on the world size."
            )
        saved_share = state.get("share", SHARE_DOCUMENTS)  # positions from before members were shared
        if saved_share != self.stream.share:
            raise ValueError(
                f"the streaming data position was saved with ranks sharing the source by {saved_share}, this run "
                f"shares it by {self.stream.share} (the source's files/tar members changed?): cannot resume exactly; "
                "see data/openwebtext2/README.md"
            )
        for key, mine in (("block_size", self.block_size), ("shuffle_buffer", self.shuffle_buffer), ("seed", self.seed)):
            if int(state[key]) != mine:
                raise ValueError(f"streaming data position was saved with {key}={state[key]}, this run has "
                                 f"{key}={mine}: cannot resume exactly")
        mine = state["ranks"].get(str(self.rank))
        if mine is None:
            raise ValueError(
                f"the streaming data position holds ranks {sorted(state['ranks'], key=int)} but not rank {self.rank}: "
                "save every rank's data.state_dict() (merge them with agdlm.data.merge_states)"
            )
        self.batches_consumed = int(state.get("batches_consumed", 0))
        self.stream.bad.load_state_dict(mine.get("losses", {}))  # the metrics' counts go on from there
        self._restart(
            epoch=mine["epoch"], cursor=mine["cursor"], token_offset=mine["token_offset"],
            chunk_index=mine["chunk_index"], blocks_emitted=mine["blocks_emitted"],
        )


def merge_states(states: list[dict]) -> dict:
    """One data position from every rank's state_dict (e.g. after all_gather_object).
    Block-sampled positions are the same on every rank; streaming ones are merged per rank."""
    first = dict(states[0])
    if first.get("kind") != "stream":
        return first
    ranks = {}
    for s in states:
        ranks.update(s["ranks"])
    first["ranks"] = ranks
    return first
