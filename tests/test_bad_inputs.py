"""Bad inputs to the data layer, built for real: a prepare killed with SIGKILL, tars made with
tarfile and then byte-damaged, text lists holding non-strings, unwritable outputs, mistyped
paths. The table runs each through the real CLI and asserts exit code 2, one `agdlm...` line
on stderr naming the file or key (no traceback), and that nothing written before changed.
The focused tests below it pin the counts of documents and members lost (issue 9, items 7, 8,
9, 11, 12)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agdlm.config import Config
from agdlm.data import DataSourceError, build_data
from agdlm.data.prepare import main as prepare_main
from agdlm.data.sources import BadRecords, open_stream
from conftest import TINY
from test_data_sources import jsonl_bytes, make_docs, write_jsonl, write_tar, zst

# ---- building the bad inputs -------------------------------------------------------------

MEMBER_DOCS = 20


def member_docs(k: int) -> list[str]:
    return make_docs(MEMBER_DOCS, f"m{k}")


def three_member_tar(path: Path) -> Path:
    """An OpenWebText2-like archive: members m0, m1, m2 of 20 documents each."""
    return write_tar(path, {f"m{k}.jsonl.zst": zst(jsonl_bytes(member_docs(k))) for k in range(3)})


def damaged_tar(path: Path, damage: str) -> Path:
    """The three-member tar with m1 damaged: `magic` (its zstd frame magic overwritten: the
    decoder refuses it), `garbled` (bytes inside its compressed data zeroed: it decodes to
    garbage), or `header` (its tar header overwritten: the checksum fails)."""
    raw = bytearray(three_member_tar(path).read_bytes())
    header = raw.index(b"m1.jsonl.zst")
    data = header + 512
    if damage == "magic":
        raw[data : data + 4] = b"\x00\x01\x02\x03"
    elif damage == "garbled":
        raw[data + 20 : data + 60] = b"\x00" * 40
    elif damage == "header":
        raw[header + 100 : header + 160] = b"\xff" * 60
    path.write_bytes(bytes(raw))
    return path


def killed_prepare(tmp_path: Path) -> Path:
    """An `agdlm prepare` killed with SIGKILL mid-way: ~20 MB of documents take it seconds,
    and the kill lands as soon as its second shard file appears."""
    source = write_jsonl(tmp_path / "big.jsonl", make_docs(60_000))
    out = tmp_path / "prepared"
    proc = subprocess.Popen([sys.executable, "-m", "agdlm", "prepare", str(source), str(out), "--workers", "1",
                             "--batch-docs", "16", "--shard-tokens", "20000", "--val-fraction", "0.3", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not (out / "train_000001.bin").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "prepare stopped before the kill"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "meta.json").exists(), "prepare finished before the kill: give it more documents"
    source.unlink()
    return out


def finished_prepare(tmp_path: Path, name: str = "prepared") -> tuple[Path, Path]:
    source = write_jsonl(tmp_path / "docs.jsonl", make_docs(300))
    out = tmp_path / name
    assert prepare_main([str(source), str(out), "--workers", "1", "--val-fraction", "0.2", "--no-progress"]) == 0
    return source, out


def text_lists_source(tmp_path: Path) -> Path:
    path = tmp_path / "lists.jsonl"
    path.write_text('{"text": [1, null, {"a": 2}]}\n{"text": ["a paragraph", 3]}\n{"text": [null]}\n')
    return path


# ---- the table ---------------------------------------------------------------------------


@dataclass
class Case:
    argv: list[str]
    names: list[str]  # each must appear in the error line
    env: dict[str, str] = field(default_factory=dict)
    max_seconds: float = 120.0


def train(tmp_path: Path, *overrides: str) -> list[str]:
    return ["train", *TINY, f"train.out_dir={tmp_path / 'runs'}", "train.max_steps=2", *overrides]


def case_train_on_killed_prepare(tmp_path):
    out = killed_prepare(tmp_path)
    return Case(train(tmp_path, f"data.source={out}"), [f"{out}/meta.json", "unfinished"])


def case_prepare_into_finished_folder(tmp_path):
    source, out = finished_prepare(tmp_path)
    return Case(["prepare", str(source), str(out), "--no-progress"], [f"{out}/meta.json", "--overwrite"])


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def case_prepare_val_fraction(tmp_path, value):
    source = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    return Case(["prepare", str(source), str(tmp_path / "out"), f"--val-fraction={value}"], ["--val-fraction"])


def case_prepare_negative_workers(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    return Case(["prepare", str(source), str(tmp_path / "out"), "--workers", "-2"], ["--workers"])


def case_prepare_output_is_a_file(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    (tmp_path / "taken").write_text("a file the user keeps\n")
    return Case(["prepare", str(source), str(tmp_path / "taken")], [str(tmp_path / "taken"), "not a folder"])


def case_prepare_output_under_a_file(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    return Case(["prepare", str(source), str(source / "out")], [str(source / "out")])


def case_prepare_output_unwritable(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", make_docs(20))
    return Case(["prepare", str(source), "/proc/agdlm-no-such/out"], ["/proc/agdlm-no-such/out"])


def case_prepare_a_prepared_folder(tmp_path):
    _, out = finished_prepare(tmp_path)
    return Case(["prepare", str(out), str(tmp_path / "again"), "--no-progress"], [str(out), "token shards, not documents"])


def case_prepare_tar_with_garbled_member(tmp_path):
    tar = damaged_tar(tmp_path / "owt2.tar", "garbled")
    return Case(["prepare", str(tar), str(tmp_path / "out"), "--no-progress"],
                ["owt2.tar[m1.jsonl.zst]", "--max-bad-fraction"])


def case_prepare_tar_with_damaged_header(tmp_path):
    tar = damaged_tar(tmp_path / "owt2.tar", "header")
    return Case(["prepare", str(tar), str(tmp_path / "out"), "--no-progress"],
                ["owt2.tar@", "damaged tar header", "1 of 3 files/tar members"])


def case_train_tar_with_undecodable_member(tmp_path):
    tar = damaged_tar(tmp_path / "owt2.tar", "magic")
    return Case(train(tmp_path, f"data.source={tar}"), ["owt2.tar[m1.jsonl.zst]", "data.max_bad_fraction"])


def case_train_on_text_lists_of_non_strings(tmp_path):
    path = text_lists_source(tmp_path)
    return Case(train(tmp_path, f"data.source={path}"),
                [f"no readable documents in {path}, 3 bad records", f"{path}:1: ", "non-string"])


def case_prepare_without_readable_documents(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"not json\n\xff\xfe\n{}\n")
    return Case(["prepare", str(path), str(tmp_path / "out"), "--no-progress"],
                [f"no readable documents in {path}, 3 bad records", f"{path}:1: not JSON"])


def case_train_stream_with_every_document_held_out(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", make_docs(60))
    return Case(train(tmp_path, f"data.source={path}", "data.mode=stream", "data.val_fraction=0.999999"),
                ["data.val_fraction=0.999999", "every document"])


def case_train_include_not_a_name(tmp_path):
    (tmp_path / "run.yaml").write_text("include: 5\nmodel:\n  n_layer: 2\n")
    return Case(["train", str(tmp_path / "run.yaml"), f"train.out_dir={tmp_path / 'runs'}"],
                [f"{tmp_path / 'run.yaml'}", "include"])


def case_train_mistyped_local_path(tmp_path):
    (tmp_path / "mydata").mkdir()
    write_jsonl(tmp_path / "mydata" / "owt.jsonl", make_docs(5))
    return Case(train(tmp_path, "data.source=mydata/owt2"), ["mydata/owt2", "no such file or folder"], max_seconds=20)


def case_train_hub_id_offline(tmp_path):
    return Case(train(tmp_path, "data.source=nobody-here/no-such-set"),
                ["no file or folder named nobody-here/no-such-set here", "and the hub", "HF_HUB_OFFLINE"],
                env={"HF_HUB_OFFLINE": "1"}, max_seconds=20)


def case_train_prepared_folder_missing_a_shard(tmp_path):
    _, out = finished_prepare(tmp_path)
    (out / "train_000000.bin").unlink()
    return Case(train(tmp_path, f"data.source={out}"), [f"{out}/train_000000.bin", "missing"])


CASES = {name[len("case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the trainer's own run folder aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "runs" not in p.relative_to(root).parts}


def run_agdlm(case: Case, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **case.env}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "agdlm", *case.argv], cwd=cwd, capture_output=True, text=True,
                         env=env, timeout=300)
    return out, time.monotonic() - start


def _table():
    for name, fn in CASES.items():
        marks = getattr(fn, "pytestmark", [])
        values = [m.args[1] for m in marks if m.name == "parametrize"]
        for value in (values[0] if values else [None]):
            yield pytest.param(name, value, id=name if value is None else f"{name}[{value}]")


@pytest.mark.parametrize("name, value", list(_table()))
def test_bad_input_table(tmp_path, name, value):
    build = CASES[name]
    case = build(tmp_path) if value is None else build(tmp_path, value)
    before = snapshot(tmp_path)
    out, seconds = run_agdlm(case, tmp_path)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("agdlm")]
    assert len(errors) == 1, out.stderr
    for part in case.names:
        assert part in errors[0], (part, errors[0])
    others = [line for line in out.stderr.splitlines() if not line.startswith("agdlm")]
    assert all("skipped bad input" in line or "end of a pass" in line for line in others), out.stderr
    assert snapshot(tmp_path) == before, "a failed command changed files written before it"
    assert seconds < case.max_seconds


# ---- item 8: documents and members lost, counted exactly ------------------------------------


@pytest.mark.parametrize("damage", ["magic", "garbled", "header"])
def test_a_damaged_member_is_counted_and_the_next_member_read(tmp_path, damage):
    tar = damaged_tar(tmp_path / "owt2.tar", damage)
    stream = open_stream(str(tar))
    docs = list(stream.texts())
    assert docs == member_docs(0) + member_docs(2)  # exactly the 20 documents of m1 lost, m2 read
    assert (stream.bad.members, stream.bad.members_seen) == (1, 3)
    if damage != "garbled":  # garbage decodes to some lines; the others lose nothing line by line
        assert stream.bad.records == 0
    assert stream.bad.counts() == {"data_bad_records": stream.bad.records, "data_bad_members": 1}


def test_bad_counts_reach_the_loaders_and_meta_json(tmp_path, capsys):
    tar = damaged_tar(tmp_path / "owt2.tar", "header")
    expected = {"data_bad_records": 0, "data_bad_members": 1}
    cfg = Config()
    cfg.model.block_size, cfg.train.global_batch_size, cfg.train.micro_batch_size = 16, 4, 4
    cfg.data.source, cfg.data.val_fraction, cfg.data.max_bad_fraction = str(tar), 0.2, 0.5
    assert build_data(cfg).bad_counts() == expected  # memory: read at startup

    cfg.data.mode = "stream"
    data = build_data(cfg)
    while data.train.epoch == 0:
        data.train.next_batch()
    assert data.bad_counts() == data.train.bad_counts() == expected
    resumed = build_data(cfg)
    resumed.train.load_state_dict(data.train.state_dict())
    assert resumed.bad_counts() == expected  # the metrics' counters go on after a resume

    out = tmp_path / "prepared"
    assert prepare_main([str(tar), str(out), "--val-fraction", "0.2", "--max-bad-fraction", "0.5", "--no-progress"]) == 0
    assert "1 of 3 files/tar members damaged (first: " in capsys.readouterr().out  # the summary
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["bad_records"], meta["bad_members"], meta["documents"]["train"] + meta["documents"]["val"]) == (0, 1, 40)
    cfg.data.source = str(out)
    assert build_data(cfg).bad_counts() == expected


def test_the_bad_fraction_limit_stops_mid_pass_naming_the_first_bad_line(tmp_path):
    lines = jsonl_bytes(make_docs(3000)).split(b"\n")
    lines[10:60] = [b"{broken"] * 50
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines))
    stream = open_stream(str(path), bad=BadRecords(max_fraction=0.01))
    read = []
    with pytest.raises(DataSourceError, match=rf"50 of 1050 records unreadable .*max_bad_fraction=0.01; first: {path}:11: not JSON"):
        read.extend(stream.texts())
    assert len(read) == 999  # stopped once 1000 documents were read, not at the end of the pass


def test_a_mostly_unreadable_member_stops_preparation_and_leaves_nothing(tmp_path):
    tar = damaged_tar(tmp_path / "owt2.tar", "garbled")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    assert prepare_main([str(tar), str(out), "--workers", "2", "--batch-docs", "4", "--no-progress"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---- item 9: a text list holding non-strings ------------------------------------------------


def test_text_list_with_non_strings_is_a_bad_record(tmp_path, caplog):
    good = make_docs(4)
    lines = jsonl_bytes(good, paragraphs=True).split(b"\n")
    lines.insert(2, b'{"text": [1, null, {"a": 2}]}')
    path = tmp_path / "lists.jsonl"
    path.write_bytes(b"\n".join(lines))
    stream = open_stream(str(path))
    assert list(stream.texts()) == good  # never "1", "None" or "{'a': 2}"
    assert (stream.bad.records, stream.bad.members) == (1, 0)
    assert f"{path}:3: no text in column 'text': its list holds a non-string item (int)" in caplog.text


# ---- item 7: an interrupted prepare ---------------------------------------------------------


def test_killed_prepare_is_refused_by_the_trainer_and_started_over_by_prepare(tmp_path, capsys):
    out = killed_prepare(tmp_path)
    cfg = Config()
    cfg.data.source = str(out)
    with pytest.raises(DataSourceError, match=f"{out}/meta.json is missing"):
        build_data(cfg)
    source = write_jsonl(tmp_path / "docs.jsonl", make_docs(500))
    assert prepare_main([str(source), str(out), "--workers", "1", "--val-fraction", "0.3", "--shard-tokens", "20000",
                         "--no-progress"]) == 0
    assert "unfinished preparation" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert prepare_main([str(source), str(fresh), "--workers", "1", "--val-fraction", "0.3", "--shard-tokens", "20000",
                         "--no-progress"]) == 0
    assert snapshot(out).keys() == snapshot(fresh).keys()
    assert {k: v for k, v in snapshot(out).items() if k != "meta.json"} == \
           {k: v for k, v in snapshot(fresh).items() if k != "meta.json"}


def test_overwrite_replaces_a_finished_preparation(tmp_path):
    source, out = finished_prepare(tmp_path)
    (out / "notes.txt").write_text("kept\n")
    smaller = write_jsonl(tmp_path / "small.jsonl", make_docs(50))
    assert prepare_main([str(smaller), str(out), "--overwrite", "--val-fraction", "0.2", "--no-progress"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == str(smaller) and sum(meta["documents"].values()) == 50
    assert (out / "notes.txt").read_text() == "kept\n"
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(meta["files"]["train"] + meta["files"]["val"])


# ---- item 12: a mistyped local path is never sent to the hub ----------------------------------


@pytest.mark.parametrize("name", ["./owt2", "~/no-such-agdlm-data", "data/owt2.jsonl.zst", "corpus/owt2.tar",
                                  "exists/owt2"])
def test_paths_that_look_local_are_never_hub_ids(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists").mkdir()
    start = time.monotonic()
    with pytest.raises(DataSourceError, match="no such file or folder"):
        open_stream(name)
    assert time.monotonic() - start < 5


def test_bad_record_counts_reach_the_training_metrics(tmp_path):
    """The trainer logs the loader's counts: one bad record among 60 documents under a
    max_bad_fraction that tolerates it."""
    from agdlm.config import load_config
    from agdlm.train import train as run_training

    lines = jsonl_bytes(make_docs(60), paragraphs=True).split(b"\n")
    lines.insert(5, b'{"text": [1, null]}')
    source = tmp_path / "docs.jsonl"
    source.write_bytes(b"\n".join(lines))
    run_training(load_config(None, [*TINY, f"train.out_dir={tmp_path / 'runs'}", "train.run_name=counted",
                                    f"data.source={source}", "data.max_bad_fraction=0.1", "train.max_steps=2"]))
    records = [json.loads(line) for line in (tmp_path / "runs" / "counted" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records and all(r["data_bad_records"] == 1 and r["data_bad_members"] == 0 for r in train_records)
