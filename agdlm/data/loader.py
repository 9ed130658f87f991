"""Build the trainer's data: a source name -> train batches (resumable) and fixed val batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agdlm.data.demo import write_demo_shard
from agdlm.data.packing import TokenBatches, is_validation_document, tokenize_documents
from agdlm.data.sources import read_jsonl
from agdlm.data.tokenizer import gpt2_encoding


@dataclass
class Data:
    train: TokenBatches
    val: TokenBatches  # eval reads its first `eval_batches` global batches, in order


def _split_tokens(docs, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    enc = gpt2_encoding()
    train_docs, val_docs = [], []
    for text in docs:
        (val_docs if is_validation_document(text, val_fraction) else train_docs).append(text)
    if not train_docs or not val_docs:
        raise ValueError(f"data.val_fraction={val_fraction} leaves an empty train or val split")
    return tokenize_documents(train_docs, enc), tokenize_documents(val_docs, enc)


def build_data(cfg, rank: int = 0, world_size: int = 1, barrier=None) -> Data:
    """cfg is the full Config. `barrier` (if given) is called after rank 0 prepares files."""
    source = cfg.data.source
    if source == "demo":
        if rank == 0:
            write_demo_shard()
        if barrier is not None:
            barrier()
        path = write_demo_shard()
    else:
        path = source
    train_tokens, val_tokens = _split_tokens(read_jsonl(path, cfg.data.text_column), cfg.data.val_fraction)
    common = dict(
        block_size=cfg.model.block_size,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world_size,
    )
    return Data(
        train=TokenBatches(train_tokens, seed=cfg.data.seed, shuffle=True, **common),
        val=TokenBatches(val_tokens, seed=cfg.data.seed, shuffle=False, **common),
    )
