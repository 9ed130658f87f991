"""Document sources: each yields documents as text, with a position (a `Cursor`) that a
resumed reader can start from.

A source is an ordered list of shards:
  - local files: `.jsonl`, `.jsonl.zst`, `.parquet`, `.txt` (one document per file), and
    tar archives (the OpenWebText2 `.jsonl.zst.tar`) whose `.jsonl`/`.jsonl.zst` members are
    read one after another through a zstd stream decoder, never extracted to disk;
  - a folder: its supported files, sorted by path, recursively;
  - a Hugging Face hub dataset: a repository holding `.tar` files is read through
    huggingface_hub's HfFileSystem with the same tar reader (range requests: the archive is
    never downloaded whole, and a resume seeks to the remembered member's offset); any other
    dataset id (or `hub:<local folder laid out like a hub dataset>`) streams through
    `datasets.load_dataset(..., streaming=True)`.

OpenWebText2 lines are {"text": ..., "meta": {...}}; `text` may be a list of paragraphs,
joined here with blank lines.

Records are numbered by their line (row, example) within a file or tar member; a stream
numbers all records of an epoch with a global `index`, and reader `offset` of `stride`
readers takes its share, disjoint from the others', all readers together seeing every record
once per epoch: by documents (the records with index % stride == offset; every reader walks
the whole stream, counting other readers' records without parsing them), or, when the source
has at least as many data members (files, .jsonl tar members) as readers, by members (member
u goes whole to reader u % stride; the others are never opened or decompressed).

Bad input is skipped, counted in `BadRecords` and logged once with the file and line:
records one by one (a non-JSON line, a line without text, a text list holding non-strings,
non-UTF-8 bytes) and files or tar members lost whole or from some point on (a corrupt or
truncated zstd stream, a damaged tar header -- the reader skips to the next intact header --, a
truncated tar). A pass over the source ends with a summary; past `max_fraction` unreadable
records or members, or with no readable document at all, it stops with `DataSourceError`
naming the source and the first bad place. A missing path, an unreadable source, or a folder
of `agdlm prepare` output given as raw documents raises `DataSourceError` naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import zstandard

log = logging.getLogger("agdlm.data")

OPENWEBTEXT2_HUB_ID = "segyges/OpenWebText2"
SOURCE_ALIASES = {"openwebtext2": OPENWEBTEXT2_HUB_ID, "owt2": OPENWEBTEXT2_HUB_ID}
HUB_PREFIX = "hub:"
READ_CHUNK = 1 << 20


class DataSourceError(RuntimeError):
    """A missing or unreadable source, phrased to name it."""


class Cursor(NamedTuple):
    """Where the next record is: shard number, tar member (header offset and number), record
    (line / row) within the file or member, the record's index in the epoch (over the whole
    stream when documents are split; over this reader's members when members are), and the
    data member's number (`unit`: files and .jsonl tar members, counted over the source)."""

    shard: int = 0
    member_offset: int = 0
    member_index: int = 0
    record: int = 0
    index: int = 0
    unit: int = 0


EARLY_CHECK_MIN_RECORDS = 1000  # below these, a fraction says little: the end of the pass decides
EARLY_CHECK_MIN_MEMBERS = 20


class BadRecords:
    """What a reader could not read, for the end-of-pass summary, the metrics and the limit.

    records: records skipped one by one (a line that is not JSON or not UTF-8, no text, a text
      list holding non-strings, a .txt file that is not UTF-8);
    members: files or tar members lost whole or from some point on (a corrupt or truncated
      zstd stream, a damaged tar header, a file that is not a tar), or whose records were
      mostly unreadable (corrupt zstd data the decoder cannot see decodes to garbage lines).
    Past `max_fraction` of either, `DataSourceError` stops the reader, naming the first bad place.
    The first `max_logged` are logged one by one with their file (and member) and line. The
    counts describe one pass over the source: later epochs find the same losses, so they are
    counted (and logged) once, by the first pass that reaches the end."""

    def __init__(self, max_logged: int = 50, max_fraction: float = 1.0, limit_name: str = "data.max_bad_fraction"):
        self.max_logged, self.max_fraction, self.limit_name = max_logged, max_fraction, limit_name
        self.source = ""
        self.records = self.members = 0  # lost
        self.documents = self.members_seen = 0  # read
        self.first: tuple[str, str] | None = None
        self.complete = False  # a pass reached the end: the counts are the source's
        self._logged = 0
        self._member: list | None = None  # the open member: [where, good records, bad records, lost]

    @property
    def count(self) -> int:
        return self.records + self.members

    def counts(self) -> dict[str, int]:
        return {"data_bad_records": self.records, "data_bad_members": self.members}

    # the readers report here
    def start_member(self, where: str) -> None:
        if self.complete:
            return
        self.members_seen += 1
        self._member = [where, 0, 0, False]
        self.check(final=False)

    def document(self) -> None:
        if self.complete:
            return
        self.documents += 1
        if self._member is not None:
            self._member[1] += 1
        if self.documents % EARLY_CHECK_MIN_RECORDS == 0:  # losses may have stopped; their share has not
            self.check(final=False)

    def add(self, where: str, reason: str) -> None:
        """One record skipped."""
        if self.complete:
            return
        self.records += 1
        if self._member is not None:
            self._member[2] += 1
        self._note(where, reason)

    def lose_member(self, where: str, reason: str) -> None:
        """The open member from here on, or (none open) a whole member or file, is unreadable."""
        if self.complete:
            return
        if self._member is None:
            self.members_seen += 1
        elif self._member[3]:
            return
        else:
            self._member[3] = True
        self.members += 1
        self._note(where, reason)

    def end_member(self) -> None:
        where, good, bad, lost = self._member or ("", 0, 0, True)
        self._member = None
        if not lost and bad > good:
            self.members += 1
            self._note(where, f"{bad} of its {good + bad} records unreadable: counted as a damaged member")

    def _note(self, where: str, reason: str) -> None:
        self.first = self.first or (where, reason)
        self._logged += 1
        if self._logged <= self.max_logged:
            log.warning("skipped bad input at %s: %s", where, reason)
            if self._logged == self.max_logged:
                log.warning("further bad records are counted but not logged one by one")
        self.check(final=False)

    # the limit and the summary
    def check(self, final: bool) -> None:
        """Raise past `max_fraction`; mid-pass only once enough has been read to judge."""
        for what, bad, seen, minimum in (
            ("records", self.records, self.records + self.documents, EARLY_CHECK_MIN_RECORDS),
            ("files/tar members", self.members, self.members_seen, EARLY_CHECK_MIN_MEMBERS),
        ):
            if seen and (final or seen >= minimum) and bad / seen > self.max_fraction:
                raise DataSourceError(
                    f"data source {self.source}: {bad} of {seen} {what} unreadable ({bad / seen:.1%}), more than "
                    f"{self.limit_name}={self.max_fraction}; first: {self.first_bad()}"
                )

    def first_bad(self) -> str:
        return f"{self.first[0]}: {self.first[1]}" if self.first else "none"

    def summary(self) -> str:
        return (f"{self.documents} documents read; {self.records} bad records, {self.members} of "
                f"{self.members_seen} files/tar members damaged; first: {self.first_bad()}")

    def state_dict(self) -> dict:
        return {"records": self.records, "members": self.members, "documents": self.documents,
                "members_seen": self.members_seen, "complete": self.complete}

    def load_state_dict(self, state: dict) -> None:
        for key in ("records", "members", "documents", "members_seen"):
            setattr(self, key, int(state.get(key, 0)))
        self.complete = bool(state.get("complete", False))


def text_or_problem(record, text_column: str = "text") -> tuple[str | None, str]:
    """(the record's text, "") or (None, why it has none)."""
    if not isinstance(record, dict):
        return None, f"no text: the record is a JSON {type(record).__name__}, not an object"
    text = record.get(text_column)
    if isinstance(text, list):  # OpenWebText2 paragraphs
        odd = [p for p in text if not isinstance(p, str)]
        if odd:
            return None, f"no text in column {text_column!r}: its list holds a non-string item ({type(odd[0]).__name__})"
        text = "\n\n".join(text)
    if text is None:
        return None, f"no text in column {text_column!r}"
    if not isinstance(text, str):
        return None, f"no text in column {text_column!r} (type {type(text).__name__}, not a string)"
    return (text, "") if text else (None, f"no text in column {text_column!r} (empty)")


def document_text(record, text_column: str = "text") -> str | None:
    return text_or_problem(record, text_column)[0]


# ---- byte streams ------------------------------------------------------------------------


def zstd_chunks(raw, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """Decompressed bytes of a (multi-frame) zstd stream; a truncated last frame raises."""
    dctx = zstandard.ZstdDecompressor()
    dobj, pending = None, False
    while True:
        data = raw.read(chunk_size)
        if not data:
            break
        while data:
            if dobj is None:
                dobj, pending = dctx.decompressobj(), True
            out = dobj.decompress(data)
            if out:
                yield out
            if dobj.eof:
                data, dobj, pending = dobj.unused_data, None, False
            else:
                data = b""
    if pending:
        raise zstandard.ZstdError("truncated zstd stream (its last frame is incomplete)")


def plain_chunks(raw, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    while chunk := raw.read(chunk_size):
        yield chunk


def byte_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


READ_ERRORS = (zstandard.ZstdError, tarfile.TarError, OSError, EOFError)


# ---- shards ------------------------------------------------------------------------------


class Shard:
    """A file (or hub dataset) of documents: one data member, unless it holds members itself."""

    name: str
    holds_members = False  # a tar: its .jsonl members are the data members, numbered by the reader

    def read(self, stream: "DocumentStream", start: Cursor) -> Iterator[tuple[Cursor, str]]:
        raise NotImplementedError

    def count_members(self, at_least: int) -> int:
        """How many data members it holds (counting may stop once `at_least` are found)."""
        return 1


def _jsonl_records(stream, lines, where, start):
    """Records of one jsonl file or tar member, from line `start.record`; advances stream.index.
    Returns True when the rest of its bytes could not be read."""
    column, bad = stream.text_column, stream.bad
    bad.start_member(where)
    lineno = start.record - 1
    try:
        for lineno, raw in enumerate(lines, 0):
            if lineno < start.record:
                continue
            index = stream.index
            stream.index += 1
            if not stream.takes(index) or not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as e:
                bad.add(f"{where}:{lineno + 1}", f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except ValueError as e:
                bad.add(f"{where}:{lineno + 1}", f"not JSON ({e})")
                continue
            text, problem = text_or_problem(record, column)
            if text is None:
                bad.add(f"{where}:{lineno + 1}", problem)
                continue
            yield start._replace(record=lineno, index=index), text
    except READ_ERRORS as e:
        bad.lose_member(f"{where}:{lineno + 2}", f"unreadable data, rest of it skipped ({type(e).__name__}: {e})")
        bad.end_member()
        return True
    bad.end_member()
    return False


def _is_jsonl(name: str) -> bool:
    n = name.lower()
    return n.endswith((".jsonl", ".jsonl.zst", ".json.zst", ".json"))


class JsonlShard(Shard):
    def __init__(self, path: Path):
        self.path, self.name = Path(path), str(path)

    def read(self, stream, start):
        with _open_local(self.path) as raw:
            if start.record == 0 and os.fstat(raw.fileno()).st_size == 0:
                log.warning("empty file skipped: %s", self.name)
                return
            stream.opened.append(self.name)
            chunks = zstd_chunks(raw) if self.name.endswith(".zst") else plain_chunks(raw)
            yield from _jsonl_records(stream, byte_lines(stream.counted(chunks)), self.name, start)


class TextShard(Shard):
    """A `.txt` file is one document."""

    def __init__(self, path: Path):
        self.path, self.name = Path(path), str(path)

    def read(self, stream, start):
        index = stream.index
        stream.index += 1
        if start.record > 0 or not stream.takes(index):
            return
        stream.opened.append(self.name)
        with _open_local(self.path) as raw:
            data = raw.read()
        stream.bytes_read += len(data)
        try:  # the file is one record: a bad one is counted once, as a record
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            stream.bad.add(f"{self.name}:{line}", f"not UTF-8 ({e.reason} at byte {e.start}); file skipped")
            text = ""
        else:
            if not text.strip():
                log.warning("empty file skipped: %s", self.name)
                text = ""
        if text:
            yield start._replace(record=0, index=index), text


class ParquetShard(Shard):
    def __init__(self, path: Path):
        self.path, self.name = Path(path), str(path)

    def read(self, stream, start):
        import pyarrow.parquet as pq

        if not self.path.exists():
            raise DataSourceError(f"data source file not found: {self.name}")
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:
            raise DataSourceError(f"cannot read parquet file {self.name}: {e}") from e
        column = stream.text_column
        if column not in pf.schema_arrow.names:
            raise DataSourceError(f"{self.name}: no column {column!r} (columns: {', '.join(pf.schema_arrow.names)})")
        row0 = 0
        stream.opened.append(self.name)
        stream.bad.start_member(self.name)
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if row0 + rows <= start.record:  # resume: skip whole row groups unread
                row0 += rows
                continue
            values = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
            for i, value in enumerate(values):
                row = row0 + i
                if row < start.record:
                    continue
                index = stream.index
                stream.index += 1
                if not stream.takes(index):
                    continue
                text, problem = text_or_problem({column: value}, column)
                if text is None:
                    stream.bad.add(f"{self.name}:row {row}", problem)
                    continue
                yield start._replace(record=row, index=index), text
            row0 += rows
        stream.bad.end_member()


class TarShard(Shard):
    """The `.jsonl(.zst)` members of a tar archive, member by member.

    `opener()` returns a binary file object; when it is seekable (a local file, or
    HfFileSystem's file, which turns reads into HTTP range requests) the archive is opened at
    the remembered member's header offset, so a resume seeks there instead of re-reading what
    comes before, and members are walked header to header. A non-seekable object is read
    with tarfile's stream mode from the start."""

    holds_members = True

    def __init__(self, name: str, opener: Callable[[], object], probe_opener: Callable[[], object] | None = None):
        self.name, self.opener = name, opener
        self.probe_opener = probe_opener or opener  # for counting members: headers only (small reads)

    def count_members(self, at_least: int) -> int:
        """The .jsonl members, header to header without decompressing; stops at `at_least`.
        An unreadable or damaged archive counts what was found before the damage."""
        found = 0
        try:
            with self.probe_opener() as fileobj:
                seekable = getattr(fileobj, "seekable", lambda: False)()
                tar = tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|")
                while found < at_least and (member := tar.next()) is not None:
                    found += member.isfile() and _is_jsonl(member.name)
                    tar.members.clear()  # headers only: keep memory flat on big archives
        except Exception as e:  # the reader names the damage when it gets there
            log.info("counting members of %s stopped at %d: %s", self.name, found, e)
        return found

    def read(self, stream, start):
        try:
            fileobj = self.opener()
        except FileNotFoundError as e:
            raise DataSourceError(f"data source file not found: {self.name}") from e
        except Exception as e:
            raise DataSourceError(f"cannot open {self.name}: {e}") from e
        with fileobj:
            if getattr(fileobj, "seekable", lambda: False)():
                yield from self._read_seekable(stream, fileobj, start)
            else:
                yield from self._read_stream(stream, fileobj, start)

    def _read_seekable(self, stream, fileobj, start):
        """Header to header; past a damaged header, on from the next intact one."""
        offset, member_index, record0 = start.member_offset, start.member_index, start.record
        while True:
            fileobj.seek(offset)
            try:
                tar, problem = tarfile.open(fileobj=fileobj, mode="r:"), ""
            except tarfile.ReadError as e:
                if offset == 0 and _is_empty(fileobj):
                    log.warning("empty file skipped: %s", self.name)
                    return
                tar, problem = None, str(e)
            rest_lost = False
            while tar is not None:
                try:
                    member = tar.next()
                except tarfile.TarError as e:
                    problem = str(e)
                    break
                if member is None:
                    break
                rest_lost = yield from self._member(stream, tar, member, member.offset, member_index, start.shard, record0)
                member_index, record0 = member_index + 1, 0
            stop = tar.offset if tar is not None else offset
            if tar is not None and not problem and _has_end_marker(fileobj, stop):
                return
            resume = _next_header_offset(fileobj, stop + tarfile.BLOCKSIZE)
            if resume is None:
                if tar is None and stop == 0:
                    stream.bad.lose_member(self.name, f"not a readable tar ({problem}); file skipped")
                elif not rest_lost:  # a member whose data ran out was counted already
                    stream.bad.lose_member(f"{self.name} after member {member_index}",
                                           f"truncated tar, rest skipped ({problem or 'no end-of-archive marker'})")
                return
            stream.bad.lose_member(f"{self.name}@{stop} (member {member_index})",
                                   f"damaged tar header ({problem or 'bad checksum'}); went on at the next header, "
                                   f"byte {resume}")
            offset, member_index, record0 = resume, member_index + 1, 0

    def _read_stream(self, stream, fileobj, start):
        """tarfile's stream mode: skip to the member by reading; a damaged header ends the archive."""
        left = start.member_offset
        while left > 0:
            skipped = len(fileobj.read(min(left, READ_CHUNK)))
            if not skipped:
                break
            left -= skipped
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r|")
        except tarfile.ReadError as e:
            stream.bad.lose_member(f"{self.name}@{start.member_offset}", f"not a readable tar ({e}); file skipped")
            return
        member_index, record0 = start.member_index, start.record
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as e:
                stream.bad.lose_member(f"{self.name} after member {member_index}",
                                       f"truncated or damaged tar, rest skipped ({e})")
                return
            if member is None:
                return
            offset = start.member_offset + member.offset
            yield from self._member(stream, tar, member, offset, member_index, start.shard, record0)
            member_index, record0 = member_index + 1, 0

    def _member(self, stream, tar, member, offset, member_index, shard, record0):
        """The records of one `.jsonl(.zst)` member (others, and other readers' members, are
        passed over undecompressed); True when its data could not be read to the end."""
        if not (member.isfile() and _is_jsonl(member.name)):
            return False
        unit = stream.next_unit()
        if not stream.owns(unit):
            return False
        name = f"{self.name}[{member.name}]"
        stream.opened.append(name)
        f = tar.extractfile(member)
        chunks = zstd_chunks(f) if member.name.endswith(".zst") else plain_chunks(f)
        start = Cursor(shard, offset, member_index, record0, unit=unit)
        return (yield from _jsonl_records(stream, byte_lines(stream.counted(chunks)), name, start))


def _has_end_marker(fileobj, offset: int) -> bool:
    fileobj.seek(offset)
    tail = fileobj.read(1024)
    return len(tail) == 1024 and not tail.strip(b"\0")


TAR_SCAN_CHUNK = 2 << 20  # a multiple of the 512-byte tar block


def _next_header_offset(fileobj, offset: int) -> int | None:
    """The first intact tar header at or after `offset` (block-aligned): found by its ustar
    magic, then checked by tarfile (checksum included). None at the end of the file."""
    while True:
        fileobj.seek(offset)
        chunk = fileobj.read(TAR_SCAN_CHUNK)
        usable = len(chunk) - len(chunk) % tarfile.BLOCKSIZE
        if usable == 0:
            return None
        hit = chunk.find(b"ustar", 257, usable)
        while hit != -1:
            block = hit - 257
            if block % tarfile.BLOCKSIZE == 0 and _is_tar_header(chunk[block : block + tarfile.BLOCKSIZE]):
                return offset + block
            hit = chunk.find(b"ustar", hit + 1, usable)
        offset += usable


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _is_empty(fileobj) -> bool:
    try:
        fileobj.seek(0, os.SEEK_END)
        return fileobj.tell() == 0
    except Exception:
        return False


class HubDatasetShard(Shard):
    """A dataset through `datasets.load_dataset(name, streaming=True)`: a hub id, or a local
    folder laid out like a hub dataset (the same call). Resume skips `record` examples."""

    def __init__(self, name: str, split: str = "train"):
        self.name, self.split = name, split

    def read(self, stream, start):
        import datasets

        try:
            ds = datasets.load_dataset(self.name, split=self.split, streaming=True)
        except Exception as e:
            offline = " (HF_HUB_OFFLINE=1: only the local cache is read)" if _hub_offline() else ""
            hub = f"cannot open dataset {self.name!r} (split {self.split!r}){offline}: {type(e).__name__}: {e}"
            if os.path.exists(self.name):  # a local folder laid out like a hub dataset
                raise DataSourceError(hub) from e
            # a mistyped local path reads like a hub id: say that neither was found
            raise DataSourceError(f"data source {self.name}: no file or folder named {self.name} here ({os.getcwd()}), "
                                  f"and the hub {hub}") from e
        if start.record:
            ds = ds.skip(start.record)
        column = stream.text_column
        stream.opened.append(self.name)
        stream.bad.start_member(self.name)
        for row, example in enumerate(ds, start.record):
            index = stream.index
            stream.index += 1
            if not stream.takes(index):
                continue
            text, problem = text_or_problem(example, column)
            if text is None:
                stream.bad.add(f"{self.name}:example {row}", problem)
                continue
            yield start._replace(record=row, index=index), text
        stream.bad.end_member()


# ---- resolving a source name ---------------------------------------------------------------


def _open_local(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataSourceError(f"data source file not found: {path}") from None
    except OSError as e:
        raise DataSourceError(f"cannot read data source file {path}: {e}") from e


def local_shard(path: Path) -> Shard | None:
    name = path.name.lower()
    if name.endswith(".tar"):
        return TarShard(str(path), lambda: _open_local(path))
    if _is_jsonl(name):
        return JsonlShard(path)
    if name.endswith(".parquet"):
        return ParquetShard(path)
    if name.endswith(".txt"):
        return TextShard(path)
    return None


LOCAL_SUFFIXES = (".jsonl", ".zst", ".json", ".parquet", ".txt", ".tar")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    local_suffix = source.lower().endswith(LOCAL_SUFFIXES)
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")) and not local_suffix


def _looks_local(source: str) -> bool:
    """A name meant as a path, never sent to the hub (a typo there waits on ~30 s of retries):
    it starts with . / ~, ends in a data file suffix, or its first part exists here."""
    first = source.split("/", 1)[0]
    return source.startswith((".", "/", "~")) or source.lower().endswith(LOCAL_SUFFIXES) or (
        bool(first) and os.path.exists(first))


# `agdlm prepare` output: its shard files (a .tmp while being written) and meta.json, written last.
PREPARED_FILE = re.compile(r"(train|val)_\d{6}\.bin(\.tmp)?")
PREPARED_MARKER = "meta.json"


def prepared_files(folder: str | Path) -> list[Path]:
    """The shard files (finished or not) that `agdlm prepare` wrote in `folder`."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if PREPARED_FILE.fullmatch(e.name) and e.is_file())


def is_prepared_folder(source: str | Path) -> bool:
    """A folder `agdlm prepare` wrote into, finished (meta.json) or not (shards only)."""
    if not os.path.isdir(source):
        return False
    return bool(prepared_files(source)) or is_prepare_meta(Path(source) / PREPARED_MARKER)


def is_prepare_meta(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "files" in meta and "tokens" in meta


def local_shards(source: str | Path) -> list[Shard]:
    path = Path(source).expanduser()
    if not path.exists():
        hint = f"; for a hub dataset write hub:{source}" if _looks_like_hub_id(str(source)) else ""
        raise DataSourceError(f"data source not found: {source} (no such file or folder{hint})")
    if path.is_file():
        shard = local_shard(path)
        if shard is None:
            raise DataSourceError(f"data source {source}: unsupported file type (use .jsonl, .jsonl.zst, .parquet, .txt or .tar)")
        return [shard]
    if is_prepared_folder(path):
        raise DataSourceError(f"data source {source} is a folder of `agdlm prepare` token shards, not documents: "
                              f"train on it with data.source={source}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    shards = [s for s in map(local_shard, files) if s is not None]
    if not shards:
        raise DataSourceError(f"data source folder {source} holds no .jsonl, .jsonl.zst, .parquet, .txt or .tar files")
    return shards


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_shards(repo_id: str, split: str = "train") -> list[Shard]:
    """A hub repository holding tar archives is read through HfFileSystem; any other dataset
    (or one whose listing fails) streams through `datasets`, which offline reads its cache."""
    tars = []
    if not _hub_offline():
        try:
            from huggingface_hub import HfFileSystem

            fs = HfFileSystem()
            tars = sorted(p for p in fs.find(f"datasets/{repo_id}") if p.endswith(".tar"))
        except Exception as e:  # offline, private, or not a dataset repo: let `datasets` say why
            log.info("listing hub dataset %s failed (%s); using datasets streaming", repo_id, e)
    if tars:
        return [TarShard(f"hf://{t}", lambda t=t: fs.open(t, "rb", block_size=8 << 20),
                         probe_opener=lambda t=t: fs.open(t, "rb", block_size=64 << 10))  # headers: small ranges
                for t in tars]
    return [HubDatasetShard(repo_id, split)]


def resolve_shards(source: str, split: str = "train") -> list[Shard]:
    """A source name -> shards: `hub:<id or folder>` forces `datasets`; an existing path (or
    anything that looks like one) is local; otherwise a hub dataset id."""
    source = SOURCE_ALIASES.get(source, source)
    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX):]
        if os.path.isdir(name) or not _looks_like_hub_id(name):
            if not os.path.exists(name):
                raise DataSourceError(f"data source not found: {name} (no such file or folder)")
            return [HubDatasetShard(name, split)]
        return hub_shards(name, split)
    if os.path.exists(source) or _looks_local(source) or not _looks_like_hub_id(source):
        return local_shards(source)
    return hub_shards(source, split)


# ---- the stream ----------------------------------------------------------------------------


SHARE_DOCUMENTS = "documents"  # record i of the epoch -> reader i mod stride (world-size invariant)
SHARE_MEMBERS = "members"  # data member u (file / .jsonl tar member) -> reader u mod stride, read whole


def count_members(shards: list[Shard], at_least: int) -> int:
    """Data members of the shards (files, .jsonl tar members); may stop once `at_least` are found."""
    found = 0
    for shard in shards:
        if found >= at_least:
            break
        found += shard.count_members(at_least - found)
    return found


def choose_share(shards: list[Shard], readers: int) -> str:
    """Whole members per reader when there are at least as many members as readers, so each
    reader decompresses ~1/readers of the source; otherwise documents strided over readers."""
    if readers > 1 and count_members(shards, readers) >= readers:
        return SHARE_MEMBERS
    return SHARE_DOCUMENTS


class DocumentStream:
    """The documents of a list of shards, in order, for reader `offset` of `stride`.

    share="documents": the reader takes records index % stride == offset (every reader walks
    the whole stream); share="members": it takes the whole data members unit % stride ==
    offset and never opens the others. `opened` (names) and `bytes_read` (decompressed bytes)
    count what this reader actually read."""

    def __init__(self, shards: list[Shard], text_column: str = "text", stride: int = 1, offset: int = 0,
                 bad: BadRecords | None = None, name: str = "", share: str = SHARE_DOCUMENTS):
        if not 0 <= offset < stride:
            raise ValueError(f"reader offset {offset} is not in [0, {stride})")
        if share not in (SHARE_DOCUMENTS, SHARE_MEMBERS):
            raise ValueError(f"share must be {SHARE_DOCUMENTS!r} or {SHARE_MEMBERS!r}, not {share!r}")
        self.shards, self.text_column, self.stride, self.offset = shards, text_column, stride, offset
        self.share = share
        self.bad = bad if bad is not None else BadRecords()
        self.name = name or ", ".join(s.name for s in shards[:3]) + (" ..." if len(shards) > 3 else "")
        self.bad.source = self.bad.source or self.name
        self.index = 0
        self.unit = 0  # the next data member's number
        self.opened: list[str] = []
        self.bytes_read = 0

    # which records and members are this reader's
    def takes(self, index: int) -> bool:
        return self.share == SHARE_MEMBERS or index % self.stride == self.offset

    def owns(self, unit: int) -> bool:
        return self.share == SHARE_DOCUMENTS or unit % self.stride == self.offset

    def next_unit(self) -> int:
        unit, self.unit = self.unit, self.unit + 1
        return unit

    def counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.bytes_read += len(chunk)
            yield chunk

    def __iter__(self) -> Iterator[tuple[Cursor, str]]:
        return self.iter_from(Cursor())

    def iter_from(self, cursor: Cursor) -> Iterator[tuple[Cursor, str]]:
        """(cursor, text) of each document from `cursor` on (that record first) to the end."""
        cursor = Cursor(*cursor)
        whole_pass = cursor == Cursor()
        self.index, self.unit = cursor.index, cursor.unit
        documents = 0
        for s in range(cursor.shard, len(self.shards)):
            shard = self.shards[s]
            start = cursor if s == cursor.shard else Cursor(shard=s, index=self.index, unit=self.unit)
            if not shard.holds_members and not self.owns(self.next_unit()):
                continue  # another reader's file: not even opened
            for item in shard.read(self, start):
                self.bad.document()
                documents += 1
                yield item
        self._end_pass(whole_pass and documents == 0)

    def _end_pass(self, found_nothing: bool) -> None:
        """The summary, the limit, and a source with nothing readable named as such."""
        bad = self.bad
        if bad.complete:  # an earlier pass said it all
            return
        bad.complete = True
        whole_source = self.stride == 1 or (self.share == SHARE_DOCUMENTS and self.index == 0)
        if found_nothing and whole_source:
            if not bad.count:
                raise DataSourceError(f"no documents in {self.name} (its files are empty)")
            members = f", {bad.members} damaged files/tar members" if bad.members else ""
            raise DataSourceError(f"no readable documents in {self.name}, {bad.records} bad records{members}, "
                                  f"first: {bad.first_bad()}")
        if bad.count:
            log.warning("data source %s, end of a pass: %s", self.name, bad.summary())
        bad.check(final=True)

    def texts(self) -> Iterator[str]:
        for _, text in self:
            yield text


def open_stream(source: str, text_column: str = "text", stride: int = 1, offset: int = 0,
                split: str = "train", bad: BadRecords | None = None, share: str = SHARE_DOCUMENTS) -> DocumentStream:
    """`share`: how readers share the source, "documents", "members" or "auto" (choose_share)."""
    shards = resolve_shards(source, split)
    share = choose_share(shards, stride) if share == "auto" else share
    return DocumentStream(shards, text_column, stride, offset, bad, name=source, share=share)


def read_jsonl(path: str | Path, text_column: str = "text") -> Iterator[str]:
    """Documents of a `.jsonl` or `.jsonl.zst` file (or any local source), in order."""
    return DocumentStream(local_shards(path), text_column).texts()
