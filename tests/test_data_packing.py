"""Packing (EOT between documents, blocks of block_size+1, x/y shift), ranks disjoint and
complete, validation never overlapping training, and exact resume on every path, including a
different-world-size resume (prepared: same global batches; streaming: refused)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agdlm.config import Config
from agdlm.data import build_data, merge_states
from agdlm.data.packing import TokenBatches, is_validation_document, tokenize_documents
from agdlm.data.prepare import prepare
from agdlm.data.tokenizer import EOT_TOKEN, gpt2_encoding
from test_data_sources import make_docs, owt2_tar, write_jsonl

BLOCK = 32


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGDLM_CACHE", str(tmp_path / "cache"))


def config(source, *, mode="auto", global_batch=8, micro=2, shuffle_buffer=0, val_fraction=0.2, seed=3) -> Config:
    cfg = Config()
    cfg.model.block_size = BLOCK
    cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.eval_batches = global_batch, micro, 2
    cfg.data.source, cfg.data.mode, cfg.data.shuffle_buffer = str(source), mode, shuffle_buffer
    cfg.data.val_fraction, cfg.data.seed = val_fraction, seed
    return cfg


def rows_of(batch) -> torch.Tensor:
    """The (rows, block_size+1) blocks of one rank's micro-batches."""
    x = torch.cat([mb[0] for mb in batch])
    y = torch.cat([mb[1] for mb in batch])
    assert torch.equal(x[:, 1:], y[:, :-1])
    return torch.cat([x, y[:, -1:]], dim=1)


def split(docs, val_fraction=0.2):
    train = [d for d in docs if not is_validation_document(d, val_fraction)]
    val = [d for d in docs if is_validation_document(d, val_fraction)]
    assert train and val
    return train, val


def test_tokenize_documents_puts_eot_after_each_document():
    enc = gpt2_encoding()
    docs = make_docs(5)
    tokens = tokenize_documents(docs, enc)
    ends = np.flatnonzero(tokens == EOT_TOKEN)
    lengths = np.diff(np.concatenate([[-1], ends])) - 1
    assert len(ends) == 5 and ends[-1] == len(tokens) - 1
    assert lengths.tolist() == [len(enc.encode_ordinary(d)) for d in docs]
    assert tokenize_documents(docs, enc, threads=2).tolist() == tokens.tolist()


def test_blocks_are_block_size_plus_one_and_cover_the_stream(tmp_path):
    docs = make_docs(40)
    path = write_jsonl(tmp_path / "a.jsonl.zst", docs)
    train_docs, _ = split(docs)
    expected = tokenize_documents(train_docs, gpt2_encoding())
    data = build_data(config(path, mode="stream"))
    got = np.concatenate([rows_of(data.train.next_batch()).numpy() for _ in range(5)])
    assert got.shape == (40, BLOCK + 1)
    assert got.reshape(-1).tolist() == expected[: got.size].tolist()  # EOT between docs, nothing lost
    for mb_x, mb_y in data.train.next_batch():
        assert mb_x.shape == mb_y.shape == (2, BLOCK) and mb_x.dtype == torch.int64


def test_streaming_ranks_are_disjoint_and_complete(tmp_path):
    docs = make_docs(45)
    path = write_jsonl(tmp_path / "a.jsonl.zst", docs)
    train_docs, _ = split(docs)
    enc = gpt2_encoding()
    world = 3
    seen = []
    for rank in range(world):
        data = build_data(config(path, mode="stream", global_batch=6), rank, world)
        mine = [d for i, d in enumerate(docs) if i % world == rank and d in train_docs]
        seen += mine
        expected = tokenize_documents(mine, enc)
        n_rows = len(expected) // (BLOCK + 1) // 2 * 2  # whole batches within the first epoch
        got = np.concatenate([rows_of(data.train.next_batch()).numpy() for _ in range(n_rows // 2)])
        assert got.reshape(-1).tolist() == expected[: got.size].tolist()
    assert sorted(seen) == sorted(train_docs) and len(set(seen)) == len(seen)


def test_validation_never_overlaps_training(tmp_path):
    docs = make_docs(60)
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    train_docs, val_docs = split(docs)
    enc = gpt2_encoding()
    train_tokens, val_tokens = tokenize_documents(train_docs, enc), tokenize_documents(val_docs, enc)

    memory = build_data(config(path, mode="memory"))
    assert memory.train.store.arrays[0].tolist() == train_tokens.tolist()
    assert memory.val.store.arrays[0].tolist() == val_tokens.tolist()

    stream = build_data(config(path, mode="stream"))
    assert stream.val.store.arrays[0].tolist() == val_tokens[: len(stream.val.store.arrays[0])].tolist()
    streamed = [text for _, _, text in _one_epoch(stream.train)]
    assert streamed == train_docs

    prepared = tmp_path / "prep"
    prepare(str(path), prepared, workers=1, val_fraction=0.2, progress=False)
    assert np.fromfile(prepared / "train_000000.bin", "<u2").tolist() == train_tokens.tolist()
    assert np.fromfile(prepared / "val_000000.bin", "<u2").tolist() == val_tokens.tolist()


def _one_epoch(streaming):
    for item in streaming._train_documents(0, streaming._chunk_start[1]):
        if item[0] > 0:
            return
        yield item


def _batches(train, n):
    return [rows_of(train.next_batch()) for _ in range(n)]


@pytest.mark.parametrize("kind", ["jsonl.zst", "tar"])
def test_streaming_resume_is_exact(tmp_path, kind):
    docs = make_docs(30)
    if kind == "tar":
        path = owt2_tar(tmp_path / "owt2.tar", [docs[:10], docs[10:22], docs[22:]])
    else:
        path = write_jsonl(tmp_path / "a.jsonl.zst", docs)
    cfg = config(path, mode="stream", shuffle_buffer=5, global_batch=6, micro=3)
    world = 2
    full = [build_data(cfg, r, world).train for r in range(world)]
    expected = [_batches(t, 40) for t in full]  # several epochs, many chunks
    assert full[0].epoch >= 2

    first = [build_data(cfg, r, world).train for r in range(world)]
    for t in first:
        _batches(t, 17)  # stops mid-chunk and mid-document
    state = json.loads(json.dumps(merge_states([t.state_dict() for t in first])))
    assert state["ranks"]["1"]["token_offset"] > 0 or state["ranks"]["0"]["token_offset"] > 0
    for r in range(world):
        resumed = build_data(cfg, r, world).train
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(_batches(resumed, 23), expected[r][17:]))


def test_streaming_resume_on_another_world_size_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl.zst", make_docs(30))
    cfg = config(path, mode="stream", global_batch=4)
    train = build_data(cfg, 0, 2).train
    train.next_batch()
    state = train.state_dict()
    other = build_data(cfg, 0, 1).train
    with pytest.raises(ValueError, match="saved with world size 2 on 1 ranks.*agdlm prepare"):
        other.load_state_dict(state)
    rank1 = build_data(cfg, 1, 2).train
    with pytest.raises(ValueError, match="not rank 1"):
        rank1.load_state_dict(state)


def test_prepared_batches_are_world_size_invariant_and_resume_across_world_sizes(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl.zst", make_docs(80))
    out = tmp_path / "prep"
    prepare(str(path), out, workers=2, val_fraction=0.2, shard_tokens=500, progress=False)
    assert len(list(out.glob("train_*.bin"))) > 3  # several memmapped shards
    cfg = config(out, global_batch=8, micro=1)

    def global_batches(world, ks, state=None):
        ranks = [build_data(cfg, r, world) for r in range(world)]
        assert ranks[0].kind == "prepared"
        if state is not None:
            for d in ranks:
                d.train.load_state_dict(state)
        out = []
        for _ in ks:
            out.append(torch.cat([rows_of(d.train.next_batch()) for d in ranks]))
        return out, ranks[0].train.state_dict()

    reference, _ = global_batches(1, range(12))
    two, _ = global_batches(2, range(12))
    assert all(torch.equal(a, b) for a, b in zip(reference, two))
    _, state = global_batches(2, range(5))
    resumed, _ = global_batches(4, range(7), json.loads(json.dumps(state)))
    assert all(torch.equal(a, b) for a, b in zip(resumed, reference[5:]))
    val = [build_data(cfg, r, 2).val for r in range(2)]
    assert torch.equal(torch.cat([rows_of(v.batch(1)) for v in val]), rows_of(build_data(cfg).val.batch(1)))


def test_memory_path_resume_and_demo(tmp_path):
    cfg = config("demo", global_batch=4, micro=2)
    cfg.data.val_fraction = 0.05
    data = build_data(cfg)
    expected = _batches(data.train, 6)
    again = build_data(cfg)
    _batches(again.train, 2)
    state = again.train.state_dict()
    resumed = build_data(cfg, 1, 2)
    resumed.train.load_state_dict(state)
    assert torch.equal(rows_of(resumed.train.next_batch()), expected[2][2:])
    assert isinstance(data.val, TokenBatches) and data.val.batch(0)[0][0].shape == (2, BLOCK)
