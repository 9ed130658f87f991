"""`agdlm bench data`: documents/s and tokens/s of
  (a) tiktoken encode_ordinary on the documents, single thread (the reference);
  (b) the streaming loader end to end on the same documents written as a .jsonl.zst shard
      (zstd decode, JSON, hash split, tokenise, pack, shuffle buffer, tensors), one worker;
  (c) the pre-tokenised loader: a GPT-2-124M global batch (480 x 1024 tokens) from
      memmapped uint16 shards, time per batch;
and the ratio (b)/(a). Text: the pydoc topics corpus (on every machine), repeated with a
numbered header per copy until --mb megabytes. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

from agdlm.data.packing import StreamingBlocks, TokenBatches, TokenShards
from agdlm.data.sources import DocumentStream, local_shards
from agdlm.data.tokenizer import gpt2_encoding


def bench_documents(megabytes: float) -> list[str]:
    from pydoc_data.topics import topics

    base = [text for _, text in sorted(topics.items()) if text.strip()]
    docs, size, copy = [], 0, 0
    while size < megabytes * 1e6:
        for text in base:
            doc = f"Copy {copy}.\n\n{text}"
            docs.append(doc)
            size += len(doc)
        copy += 1
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agdlm bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=16.0, help="megabytes of text for (a) and (b)")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--shuffle-buffer", type=int, default=256, help="streaming shuffle buffer, in blocks")
    p.add_argument("--global-batch", type=int, default=480, help="sequences per global batch for (c)")
    p.add_argument("--prepared-tokens", type=int, default=20_000_000, help="tokens in the memmapped shards for (c)")
    p.add_argument("--batches", type=int, default=50, help="global batches timed for (c)")
    p.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    enc = gpt2_encoding()
    docs = bench_documents(args.mb)
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"documents: {len(docs):,} ({n_bytes / 1e6:.1f} MB of pydoc topics text), block_size {args.block_size}")

    # (a) the reference: tiktoken, single thread
    enc.encode_ordinary(docs[0])
    t0 = time.perf_counter()
    ids = [enc.encode_ordinary(d) for d in docs]
    a_s = time.perf_counter() - t0
    n_tokens = sum(len(x) + 1 for x in ids)  # + <|endoftext|> per document
    a_tok, a_doc = n_tokens / a_s, len(docs) / a_s
    print(f"(a) tiktoken encode_ordinary, 1 thread: {a_doc:12,.0f} docs/s {a_tok:14,.0f} tokens/s")

    with tempfile.TemporaryDirectory() as tmp:
        # (b) the streaming loader end to end, one worker
        shard = Path(tmp) / "bench.jsonl.zst"
        lines = "\n".join(json.dumps({"text": d, "meta": {"i": i}}) for i, d in enumerate(docs)) + "\n"
        shard.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines.encode()))
        span = args.block_size + 1
        rows = 8
        train = StreamingBlocks(
            DocumentStream(local_shards(shard)), enc, block_size=args.block_size, global_batch_size=rows,
            micro_batch_size=rows, shuffle_buffer=args.shuffle_buffer, val_fraction=0.0, threads=1,
        )
        # whole shuffle-buffer chunks within one epoch
        n_blocks = (n_tokens // span) // max(1, args.shuffle_buffer) * max(1, args.shuffle_buffer) // rows * rows
        t0 = time.perf_counter()
        for _ in range(n_blocks // rows):
            train.next_batch()
        b_s = time.perf_counter() - t0
        b_tok = n_blocks * span / b_s
        b_doc = len(docs) * (n_blocks * span / n_tokens) / b_s
        print(f"(b) streaming loader, 1 worker:        {b_doc:12,.0f} docs/s {b_tok:14,.0f} tokens/s "
              f"({n_blocks} blocks, shuffle buffer {args.shuffle_buffer})")
        ratio = b_tok / a_tok
        print(f"(b)/(a) = {ratio:.1%} (target >= 70%)")

        # (c) the pre-tokenised loader: memmapped uint16 shards, 4 of them
        flat = np.concatenate([np.asarray(x + [50256], dtype=np.uint16) for x in ids])
        reps = int(np.ceil(args.prepared_tokens / len(flat)))
        tokens = np.tile(flat, reps)[: args.prepared_tokens]
        paths = []
        for i, part in enumerate(np.array_split(tokens, 4)):
            path = Path(tmp) / f"train_{i:06d}.bin"
            part.astype("<u2").tofile(path)
            paths.append(path)
        store = TokenShards.from_files(paths, span)
        loader = TokenBatches(store, block_size=args.block_size, global_batch_size=args.global_batch,
                              micro_batch_size=16, seed=0)
        for _ in range(3):
            loader.next_batch()
        times = []
        for _ in range(args.batches):
            t0 = time.perf_counter()
            loader.next_batch()
            times.append(time.perf_counter() - t0)
        c_ms = float(np.median(times)) * 1e3
        c_tok = args.global_batch * args.block_size / (c_ms / 1e3)
        print(f"(c) pre-tokenised loader: a {args.global_batch} x {args.block_size} global batch in "
              f"{c_ms:.2f} ms median ({max(times) * 1e3:.2f} ms max), {c_tok:,.0f} tokens/s "
              f"({store.num_blocks:,} blocks in {len(paths)} memmapped shards; target < 10 ms)")
        del store, loader

    figures = {
        "documents": len(docs), "megabytes": n_bytes / 1e6, "tokens": n_tokens,
        "a_docs_per_s": a_doc, "a_tokens_per_s": a_tok,
        "b_docs_per_s": b_doc, "b_tokens_per_s": b_tok, "b_over_a": ratio,
        "c_batch_ms_median": c_ms, "c_batch_ms_max": max(times) * 1e3, "c_tokens_per_s": c_tok,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0
