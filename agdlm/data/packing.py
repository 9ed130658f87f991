"""Documents -> GPT-2 tokens with <|endoftext|> after each -> fixed blocks of block_size+1
-> (x, y), and a global sampler that makes batches independent of the number of ranks."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from agdlm.data.tokenizer import EOT_TOKEN


def is_validation_document(text: str, val_fraction: float) -> bool:
    """Deterministic train/val split by a hash of the document's text."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (h / 2**64) < val_fraction


def tokenize_documents(docs, encoding) -> np.ndarray:
    """Concatenate each document's tokens followed by <|endoftext|>, as uint16."""
    ids: list[int] = []
    for tokens in encoding.encode_ordinary_batch(list(docs)):
        ids.extend(tokens)
        ids.append(EOT_TOKEN)
    return np.asarray(ids, dtype=np.uint16)


class GlobalBlockSampler:
    """Decides global batch k as a list of block indices, whatever the world size.

    Blocks are the non-overlapping windows [i*(T+1), (i+1)*(T+1)) of the token array; each
    epoch visits every block once in an order seeded by (seed, epoch). Global batch k is
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
        start = k * self.global_batch_size
        out = np.empty(self.global_batch_size, dtype=np.int64)
        for j in range(self.global_batch_size):
            epoch, i = divmod(start + j, self.num_blocks)
            out[j] = self._epoch_order(epoch)[i]
        return out


def blocks_to_xy(tokens: np.ndarray, block_ids: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    span = block_size + 1
    rows = np.stack([np.asarray(tokens[b * span : (b + 1) * span], dtype=np.int64) for b in block_ids])
    data = torch.from_numpy(rows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


class TokenBatches:
    """This rank's micro-batches of each global batch, cut from a flat token array."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        block_size: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if global_batch_size % (micro_batch_size * world_size) != 0:
            raise ValueError("global batch size must divide into micro-batches over the ranks")
        self.tokens, self.block_size = tokens, block_size
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.rows_per_rank = global_batch_size // world_size
        self.sampler = GlobalBlockSampler(len(tokens) // (block_size + 1), global_batch_size, seed, shuffle)
        self.batches_consumed = 0

    def batch(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = self.sampler.global_batch(k)[self.rank * self.rows_per_rank : (self.rank + 1) * self.rows_per_rank]
        x, y = blocks_to_xy(self.tokens, ids, self.block_size)
        return list(zip(x.split(self.micro_batch_size), y.split(self.micro_batch_size)))

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = self.batch(self.batches_consumed)
        self.batches_consumed += 1
        return out

    def state_dict(self) -> dict:
        return {"kind": "blocks", "batches_consumed": self.batches_consumed, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "blocks":
            raise ValueError(f"data position of kind {state.get('kind')!r} cannot resume a block-sampled loader")
        self.batches_consumed = int(state["batches_consumed"])
