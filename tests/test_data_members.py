"""Streaming ranks share a multi-member source by whole members: from real files (a folder of
.jsonl.zst files, an OpenWebText2-style tar of .jsonl.zst members) each rank opens and
decompresses only its members (counted on the reader), all ranks together train on every
training document exactly once per epoch, a mid-epoch resume reproduces the exact batches,
and a source with fewer members than ranks keeps today's document-level split."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from agdlm.data import build_data, merge_states
from agdlm.data.packing import tokenize_documents
from agdlm.data.sources import SHARE_DOCUMENTS, SHARE_MEMBERS, Cursor, choose_share, open_stream, resolve_shards
from agdlm.data.tokenizer import gpt2_encoding
from test_data_packing import config, rows_of, split
from test_data_sources import jsonl_bytes, make_docs, owt2_tar, write_jsonl, write_tar, zst


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AGDLM_CACHE", str(tmp_path / "cache"))


def groups_of(docs, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(docs[start : start + n])
        start += n
    assert start == len(docs)
    return out


SIZES = [9, 4, 12, 7, 10, 8, 6]  # uneven members


def tar_source(tmp_path, docs):
    """A tar whose .jsonl.zst members are interleaved with a member that holds no data."""
    groups = groups_of(docs, SIZES)
    members = {}
    for i, g in enumerate(groups):
        members[f"2019-{i + 1:02d}.jsonl.zst"] = zst(jsonl_bytes(g, paragraphs=True))
        if i == 2:
            members["README.txt"] = b"not data"
    path = write_tar(tmp_path / "owt2.jsonl.zst.tar", members)
    names = [f"{path}[2019-{i + 1:02d}.jsonl.zst]" for i in range(len(groups))]
    return path, groups, names


def folder_source(tmp_path, docs):
    folder = tmp_path / "shards"
    folder.mkdir()
    groups = groups_of(docs, SIZES)
    paths = [write_jsonl(folder / f"part-{i:03d}.jsonl.zst", g) for i, g in enumerate(groups)]
    return folder, groups, [str(p) for p in paths]


SOURCES = {"tar": tar_source, "folder": folder_source}


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_decompresses_only_its_members(tmp_path, kind, world):
    docs = make_docs(sum(SIZES))
    source, groups, names = SOURCES[kind](tmp_path, docs)
    total_bytes = sum(len(jsonl_bytes(g, paragraphs=kind == "tar")) for g in groups)
    seen, read_bytes = [], 0
    for rank in range(world):
        stream = open_stream(str(source), stride=world, offset=rank, share="auto")
        assert stream.share == SHARE_MEMBERS
        mine = [t for _, t in stream]
        assert stream.opened == names[rank::world]  # the others were never opened
        expected_bytes = sum(len(jsonl_bytes(g, paragraphs=kind == "tar")) for g in groups[rank::world])
        assert stream.bytes_read == expected_bytes
        assert mine == [d for g in groups[rank::world] for d in g]
        seen += mine
        read_bytes += stream.bytes_read
    assert sorted(seen) == sorted(docs) and len(set(seen)) == len(docs)
    assert read_bytes == total_bytes  # all ranks together decompress the source once


def test_document_split_makes_every_rank_decompress_everything(tmp_path):
    """Today's split, kept for small sources: the contrast the counters must show."""
    docs = make_docs(sum(SIZES))
    source, groups, names = tar_source(tmp_path, docs)
    stream = open_stream(str(source), stride=2, offset=1, share=SHARE_DOCUMENTS)
    mine = [t for _, t in stream]
    assert stream.opened == names and mine == docs[1::2]


@pytest.mark.parametrize("kind", SOURCES)
def test_fewer_members_than_ranks_split_documents(tmp_path, kind):
    docs = make_docs(24)
    if kind == "tar":
        source = owt2_tar(tmp_path / "small.tar", [docs[:11], docs[11:]])
    else:
        (tmp_path / "two").mkdir()
        write_jsonl(tmp_path / "two" / "a.jsonl", docs[:11])
        write_jsonl(tmp_path / "two" / "b.jsonl", docs[11:])
        source = tmp_path / "two"
    shards = resolve_shards(str(source))
    assert choose_share(shards, 2) == SHARE_MEMBERS
    assert choose_share(shards, 3) == SHARE_DOCUMENTS
    assert choose_share(resolve_shards(str(write_jsonl(tmp_path / "one.jsonl.zst", docs))), 2) == SHARE_DOCUMENTS
    for rank in range(3):
        stream = open_stream(str(source), stride=3, offset=rank, share="auto")
        assert stream.share == SHARE_DOCUMENTS
        assert [t for _, t in stream] == docs[rank::3]
        assert len(stream.opened) == 2  # every rank reads every member


def _epoch_documents(train):
    """This rank's training documents of epoch 0, in stream order."""
    out = []
    for epoch, _, text in train._train_documents(0, Cursor()):
        if epoch > 0:
            return out
        out.append(text)


@pytest.mark.parametrize("kind", SOURCES)
def test_training_ranks_cover_every_training_document_once_per_epoch(tmp_path, kind, caplog):
    docs = make_docs(sum(SIZES))
    source, groups, _ = SOURCES[kind](tmp_path, docs)
    train_docs, _ = split(docs)
    world, enc = 3, gpt2_encoding()
    seen = []
    with caplog.at_level(logging.INFO, logger="agdlm.data"):
        for rank in range(world):
            data = build_data(config(source, mode="stream", global_batch=6), rank, world)
            assert data.train.stream.share == SHARE_MEMBERS
            assert data.train.state_dict()["share"] == SHARE_MEMBERS
            mine = [d for g in groups[rank::world] for d in g if d in train_docs]
            assert _epoch_documents(data.train) == mine
            expected = tokenize_documents(mine, enc)
            n_batches = len(expected) // (BLOCK_ROWS * 33)
            got = np.concatenate([rows_of(data.train.next_batch()).numpy() for _ in range(n_batches)])
            assert got.reshape(-1).tolist() == expected[: got.size].tolist()
            seen += mine
    assert sorted(seen) == sorted(train_docs) and len(set(seen)) == len(seen)
    assert "by members" in caplog.text


BLOCK_ROWS = 2  # rows per rank per batch: global_batch 6 over 3 ranks


def _batches(train, n):
    return [rows_of(train.next_batch()) for _ in range(n)]


@pytest.mark.parametrize("kind", SOURCES)
def test_members_resume_mid_epoch_is_exact(tmp_path, kind):
    docs = make_docs(sum(SIZES))
    source, _, _ = SOURCES[kind](tmp_path, docs)
    cfg = config(source, mode="stream", shuffle_buffer=5, global_batch=6, micro=2)
    world = 3
    full = [build_data(cfg, r, world).train for r in range(world)]
    expected = [_batches(t, 30) for t in full]
    assert all(t.epoch >= 1 for t in full)  # the run crossed an epoch

    first = [build_data(cfg, r, world).train for r in range(world)]
    for t in first:
        _batches(t, 7)  # mid-epoch, mid-chunk
    assert all(t.epoch == 0 for t in first)
    state = json.loads(json.dumps(merge_states([t.state_dict() for t in first])))
    assert any(Cursor(*s["cursor"]).unit > 0 for s in state["ranks"].values())  # past the first member
    for r in range(world):
        resumed = build_data(cfg, r, world).train
        resumed.load_state_dict(state)
        got = _batches(resumed, 23)
        assert all(torch.equal(a, b) for a, b in zip(got, expected[r][7:]))
        assert resumed.stream.opened[0] in first[r].stream.opened  # it seeks to its member, reads no other first


def test_resume_refuses_a_position_saved_with_the_other_share(tmp_path):
    docs = make_docs(sum(SIZES))
    source, _, _ = tar_source(tmp_path, docs)
    cfg = config(source, mode="stream", global_batch=4)
    train = build_data(cfg, 0, 2).train
    train.next_batch()
    state = train.state_dict()
    state["share"] = SHARE_DOCUMENTS
    with pytest.raises(ValueError, match="sharing the source by documents, this run shares it by members"):
        build_data(cfg, 0, 2).train.load_state_dict(state)
    del state["share"]  # a position from before members were shared: it was by documents
    with pytest.raises(ValueError, match="by documents"):
        build_data(cfg, 0, 2).train.load_state_dict(state)
