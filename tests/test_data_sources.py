"""Every source type, from real files the test writes: jsonl, jsonl.zst, parquet, txt, the
OpenWebText2 tar (with a resume that seeks to a member), a folder, and a hub-layout folder
through `datasets`. Helpers here are shared by the other data tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from agdlm.data.sources import Cursor, DataSourceError, DocumentStream, TarShard, open_stream, read_jsonl, resolve_shards

WORDS = "the quick brown fox jumps over a lazy dog while résumé naïve 東京 code() {x: 1}".split()


def make_docs(n: int, prefix: str = "doc", seed: int = 0) -> list[str]:
    """n distinct documents of varied length."""
    docs = []
    for i in range(n):
        k = 5 + (i * 37 + seed * 11) % 90
        body = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k))
        docs.append(f"{prefix} {seed}-{i}: {body}.\n\nEnd of {prefix} {i}.")
    return docs


def jsonl_bytes(docs, paragraphs: bool = False) -> bytes:
    lines = []
    for i, d in enumerate(docs):
        text = d.split("\n\n") if paragraphs else d
        lines.append(json.dumps({"text": text, "meta": {"i": i}}))
    return ("\n".join(lines) + "\n").encode()


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def write_jsonl(path: Path, docs, paragraphs: bool = False) -> Path:
    data = jsonl_bytes(docs, paragraphs)
    path.write_bytes(zst(data) if path.name.endswith(".zst") else data)
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def owt2_tar(path: Path, groups: list[list[str]]) -> Path:
    """An OpenWebText2-style archive: one .jsonl.zst member per group (paragraph lists)."""
    return write_tar(path, {f"2019-{i + 1:02d}.jsonl.zst": zst(jsonl_bytes(g, paragraphs=True)) for i, g in enumerate(groups)})


def texts(source, **kw) -> list[str]:
    return list(open_stream(str(source), **kw).texts())


def test_jsonl_and_zst(tmp_path):
    docs = make_docs(7)
    assert texts(write_jsonl(tmp_path / "a.jsonl", docs)) == docs
    assert texts(write_jsonl(tmp_path / "b.jsonl.zst", docs)) == docs
    assert list(read_jsonl(tmp_path / "b.jsonl.zst")) == docs


def test_paragraph_lists_are_joined_with_blank_lines(tmp_path):
    docs = make_docs(3)
    assert texts(write_jsonl(tmp_path / "p.jsonl.zst", docs, paragraphs=True)) == docs


def test_parquet_with_row_groups_and_resume(tmp_path):
    docs = make_docs(25)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": docs, "n": list(range(25))}), path, row_group_size=4)
    assert texts(path) == docs
    stream = open_stream(str(path))
    items = list(stream)
    resumed = [t for _, t in open_stream(str(path)).iter_from(items[13][0])]
    assert resumed == docs[13:]
    with pytest.raises(DataSourceError, match="no column 'body'"):
        texts(path, text_column="body")


def test_txt_files_are_one_document_each(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    docs = make_docs(3)
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d, encoding="utf-8")
    assert texts(folder) == docs


def test_folder_of_mixed_files_in_sorted_order(tmp_path):
    a, b, c = make_docs(3, "a"), make_docs(4, "b"), make_docs(2, "c")
    write_jsonl(tmp_path / "1.jsonl", a)
    write_jsonl(tmp_path / "2.jsonl.zst", b)
    pq.write_table(pa.table({"text": c}), tmp_path / "3.parquet")
    (tmp_path / "notes.md").write_text("ignored")
    assert texts(tmp_path) == a + b + c


def test_openwebtext2_tar_and_resume_seeks_to_member(tmp_path):
    groups = [make_docs(5, "m0"), make_docs(6, "m1"), make_docs(4, "m2")]
    path = owt2_tar(tmp_path / "openwebtext2.jsonl.zst.tar", groups)
    items = list(open_stream(str(path)))
    assert [t for _, t in items] == sum(groups, [])
    cursor = items[8][0]  # 4th document of the second member
    assert cursor.member_index == 1 and cursor.record == 3 and cursor.member_offset > 0

    # Destroy the first member's bytes: a resume that seeks to the remembered member offset
    # never reads them, so it still yields exactly the tail of the stream.
    raw = bytearray(path.read_bytes())
    raw[512 : cursor.member_offset] = b"\xff" * (cursor.member_offset - 512)
    path.write_bytes(bytes(raw))
    reads = []

    class Recording(io.BytesIO):
        def seek(self, pos, whence=0):
            reads.append(pos)
            return super().seek(pos, whence)

    shard = TarShard("owt2.tar", lambda: Recording(bytes(raw)))  # any seekable binary file object
    resumed = [t for _, t in DocumentStream([shard]).iter_from(cursor)]
    assert resumed == sum(groups, [])[8:]
    assert reads[0] == cursor.member_offset


def test_tar_through_a_non_seekable_stream(tmp_path):
    groups = [make_docs(3, "x"), make_docs(2, "y")]
    data = owt2_tar(tmp_path / "t.tar", groups).read_bytes()

    class Pipe(io.RawIOBase):
        def __init__(self):
            self.buf = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self.buf.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    items = list(DocumentStream([TarShard("pipe.tar", Pipe)]))
    assert [t for _, t in items] == groups[0] + groups[1]
    resumed = [t for _, t in DocumentStream([TarShard("pipe.tar", Pipe)]).iter_from(items[4][0])]
    assert resumed == [items[4][1]]


def test_hub_layout_folder_goes_through_datasets(tmp_path):
    repo = tmp_path / "my-org--owt-mini"
    (repo / "data").mkdir(parents=True)
    docs_a, docs_b = make_docs(4, "hubA"), make_docs(3, "hubB")
    write_jsonl(repo / "data" / "train-00000-of-00002.jsonl.zst", docs_a)
    write_jsonl(repo / "data" / "train-00001-of-00002.jsonl.zst", docs_b)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n# mini\n")
    shards = resolve_shards(f"hub:{repo}")
    assert type(shards[0]).__name__ == "HubDatasetShard"
    items = list(DocumentStream(shards))
    assert sorted(t for _, t in items) == sorted(docs_a + docs_b)
    resumed = [t for _, t in DocumentStream(resolve_shards(f"hub:{repo}")).iter_from(items[5][0])]
    assert resumed == [t for _, t in items[5:]]


def test_readers_partition_the_stream(tmp_path):
    docs = make_docs(23)
    path = write_jsonl(tmp_path / "a.jsonl.zst", docs)
    parts = [texts(path, stride=3, offset=r) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(docs)
    assert all(not set(parts[i]) & set(parts[j]) for i in range(3) for j in range(i + 1, 3))


def test_missing_and_unsupported_sources_name_the_path(tmp_path):
    with pytest.raises(DataSourceError, match="nope.jsonl"):
        open_stream(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "x.csv"
    odd.write_text("a,b\n")
    with pytest.raises(DataSourceError, match="x.csv"):
        open_stream(str(odd))
    with pytest.raises(DataSourceError, match="missing-folder"):
        open_stream("hub:" + str(tmp_path / "missing-folder"))
    assert Cursor() == (0, 0, 0, 0, 0, 0)
