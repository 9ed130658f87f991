"""Bad input: corrupt records are skipped, counted and logged with file and line; a missing
or unreadable source is an error naming it; nothing crashes mid-run."""

from __future__ import annotations

import logging

import pytest

from agdlm.config import Config
from agdlm.data import DataSourceError, build_data
from agdlm.data.prepare import main as prepare_main
from agdlm.data.sources import open_stream
from test_data_sources import jsonl_bytes, make_docs, owt2_tar, write_jsonl, write_tar, zst


def read(path, caplog):
    caplog.clear()
    stream = open_stream(str(path))
    with caplog.at_level(logging.WARNING, logger="agdlm.data"):
        docs = list(stream.texts())
    return docs, stream.bad.count, caplog.text


def test_bad_lines_are_skipped_counted_and_logged_with_file_and_line(tmp_path, caplog):
    good = make_docs(3)
    lines = jsonl_bytes(good).split(b"\n")
    data = b"\n".join([
        lines[0],
        b"{not json",  # line 2
        b'{"meta": {"url": "x"}}',  # line 3: no text
        b'{"text": "caf\xe9 latin-1"}',  # line 4: not UTF-8
        b'{"text": 12}',  # line 5: text not a string
        b"",  # blank lines are not records
        lines[1],
        b"[1, 2]",  # line 8: not an object
        lines[2],
    ]) + b"\n"
    for name in ("bad.jsonl", "bad.jsonl.zst"):
        path = tmp_path / name
        path.write_bytes(zst(data) if name.endswith(".zst") else data)
        docs, bad, text = read(path, caplog)
        assert docs == good and bad == 6  # 5 records, and the file itself: mostly unreadable
        for line, reason in ((2, "not JSON"), (3, "no text"), (4, "not UTF-8"), (5, "no text"), (8, "no text")):
            assert f"{name}:{line}: {reason}" in text


def test_corrupt_zst_member_in_tar_is_skipped_and_the_next_member_read(tmp_path, caplog):
    a, b = make_docs(4, "a"), make_docs(3, "b")
    broken = bytearray(zst(jsonl_bytes(make_docs(50, "c"))))
    broken[30:60] = b"\x00" * 30
    path = write_tar(tmp_path / "owt2.tar", {
        "1.jsonl.zst": zst(jsonl_bytes(a)),
        "2.jsonl.zst": bytes(broken),
        "3.jsonl.zst": zst(jsonl_bytes(b)),
    })
    docs, bad, text = read(path, caplog)
    assert docs[:4] == a and docs[-3:] == b and bad >= 1
    assert "owt2.tar[2.jsonl.zst]:" in text and "ZstdError" in text


def test_truncated_zst_file(tmp_path, caplog):
    data = zst(jsonl_bytes(make_docs(40)[:20])) + zst(jsonl_bytes(make_docs(40)[20:]))  # two frames
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) - 20])
    docs, bad, text = read(path, caplog)
    assert bad >= 1 and "cut.jsonl.zst:" in text and "truncated" in text
    assert docs == make_docs(40)[: len(docs)] and len(docs) >= 20


@pytest.mark.parametrize("cut", ["in_member", "at_header"])
def test_truncated_tar(tmp_path, caplog, cut):
    groups = [make_docs(5, "m0"), make_docs(200, "m1")]
    full = owt2_tar(tmp_path / "full.tar", groups).read_bytes()
    second = full.index(b"2019-02.jsonl.zst")  # the second member's header
    end = second + 512 + 100 if cut == "in_member" else second
    path = tmp_path / "cut.tar"
    path.write_bytes(full[:end])
    docs, bad, text = read(path, caplog)
    assert docs == groups[0] and bad >= 1
    assert "cut.tar" in text and ("truncated" in text or "unexpected end" in text)


def test_empty_files_are_skipped_with_a_warning(tmp_path, caplog):
    for name in ("e.jsonl", "e.jsonl.zst", "e.txt", "e.tar"):
        (tmp_path / name).write_bytes(b"")
    write_jsonl(tmp_path / "z.jsonl", make_docs(2))
    docs, bad, text = read(tmp_path, caplog)
    assert docs == make_docs(2) and bad == 0
    for name in ("e.jsonl", "e.jsonl.zst", "e.txt", "e.tar"):
        assert f"empty file skipped: {tmp_path / name}" in text


def test_non_utf8_txt_file_is_skipped_naming_file_and_line(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    (tmp_path / "b.txt").write_text("good document")
    docs, bad, text = read(tmp_path, caplog)
    assert docs == ["good document"] and bad == 1 and "a.txt:3: not UTF-8" in text


def test_missing_paths_and_empty_sources_are_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AGDLM_CACHE", str(tmp_path / "cache"))
    cfg = Config()
    cfg.data.source = str(tmp_path / "no" / "such.jsonl.zst")
    with pytest.raises(DataSourceError, match="no/such.jsonl.zst"):
        build_data(cfg)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    cfg.data.source, cfg.data.mode = str(empty), "stream"
    with pytest.raises(DataSourceError, match="no documents in .*empty.jsonl"):
        build_data(cfg).train.next_batch()
    assert prepare_main([str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err


def test_unreadable_tar_stream_names_the_file(tmp_path, caplog):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(DataSourceError, match=r"no readable documents in .*junk.tar.*not a readable tar"):
        read(path, caplog)
    assert "junk.tar" in caplog.text


def test_bad_records_do_not_stop_a_streaming_run(tmp_path, monkeypatch):
    monkeypatch.setenv("AGDLM_CACHE", str(tmp_path / "cache"))
    good = make_docs(30)
    raw = jsonl_bytes(good).split(b"\n")
    raw.insert(5, b"\xff\xfe garbage")
    raw.insert(9, b'{"text": null}')
    path = tmp_path / "mixed.jsonl.zst"
    path.write_bytes(zst(b"\n".join(raw)))
    cfg = Config()
    cfg.model.block_size, cfg.train.global_batch_size, cfg.train.micro_batch_size = 16, 4, 4
    cfg.data.source, cfg.data.mode, cfg.data.val_fraction = str(path), "stream", 0.2
    cfg.data.max_bad_fraction = 0.1  # 2 of 32 records: under the limit
    data = build_data(cfg)
    for _ in range(30):
        data.train.next_batch()
    assert data.train.bad_records >= 2
