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
readers takes the records with index % stride == offset: its part of the stream is disjoint
from the others', and all readers together see every record once per epoch. Records of
other readers are counted but never parsed.

Bad input: a non-JSON line, a line without text, non-UTF-8 bytes, a corrupt or truncated
zstd stream, a truncated tar -- the record (or the rest of the damaged file or member) is
skipped, counted in `BadRecords`, and logged once with the file and line. A missing path or
an unreadable source raises `DataSourceError` naming it.
"""

from __future__ import annotations

import json
import logging
import os
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
    (line / row) within the file or member, and the record's global index in the epoch."""

    shard: int = 0
    member_offset: int = 0
    member_index: int = 0
    record: int = 0
    index: int = 0


class BadRecords:
    """Counts skipped records; logs each of the first `max_logged` with its file and line."""

    def __init__(self, max_logged: int = 50):
        self.count = 0
        self.max_logged = max_logged

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if self.count <= self.max_logged:
            log.warning("skipped bad input at %s: %s", where, reason)
            if self.count == self.max_logged:
                log.warning("further bad records are counted but not logged one by one")


def document_text(record, text_column: str = "text") -> str | None:
    if not isinstance(record, dict):
        return None
    text = record.get(text_column)
    if isinstance(text, list):
        text = "\n\n".join(str(p) for p in text)
    return text if isinstance(text, str) and text else None


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
    name: str

    def read(self, stream: "DocumentStream", start: Cursor) -> Iterator[tuple[Cursor, str]]:
        raise NotImplementedError


def _jsonl_records(stream, lines, where, start, shard, member_offset=0, member_index=0):
    """Records of one jsonl file or tar member, from line `start.record`; advances stream.index."""
    stride, offset, column, bad = stream.stride, stream.offset, stream.text_column, stream.bad
    lineno = start.record - 1
    try:
        for lineno, raw in enumerate(lines, 0):
            if lineno < start.record:
                continue
            index = stream.index
            stream.index += 1
            if index % stride != offset or not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as e:
                bad.add(f"{where}:{lineno + 1}", f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except ValueError as e:
                bad.add(f"{where}:{lineno + 1}", f"not JSON ({e})")
                continue
            text = document_text(record, column)
            if text is None:
                bad.add(f"{where}:{lineno + 1}", f"no text in column {column!r}")
                continue
            yield Cursor(shard, member_offset, member_index, lineno, index), text
    except READ_ERRORS as e:
        bad.add(f"{where}:{lineno + 2}", f"unreadable data, rest of it skipped ({type(e).__name__}: {e})")


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
            chunks = zstd_chunks(raw) if self.name.endswith(".zst") else plain_chunks(raw)
            yield from _jsonl_records(stream, byte_lines(chunks), self.name, start, start.shard)


class TextShard(Shard):
    """A `.txt` file is one document."""

    def __init__(self, path: Path):
        self.path, self.name = Path(path), str(path)

    def read(self, stream, start):
        index = stream.index
        stream.index += 1
        if start.record > 0 or index % stream.stride != stream.offset:
            return
        with _open_local(self.path) as raw:
            data = raw.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            stream.bad.add(f"{self.name}:{line}", f"not UTF-8 ({e.reason} at byte {e.start}); file skipped")
            return
        if not text.strip():
            log.warning("empty file skipped: %s", self.name)
            return
        yield Cursor(start.shard, 0, 0, 0, index), text


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
                if index % stream.stride != stream.offset:
                    continue
                text = document_text({column: value}, column)
                if text is None:
                    stream.bad.add(f"{self.name}:row {row}", f"no text in column {column!r}")
                    continue
                yield Cursor(start.shard, 0, 0, row, index), text
            row0 += rows


class TarShard(Shard):
    """The `.jsonl(.zst)` members of a tar archive, member by member.

    `opener()` returns a binary file object; when it is seekable (a local file, or
    HfFileSystem's file, which turns reads into HTTP range requests) the archive is opened at
    the remembered member's header offset, so a resume seeks there instead of re-reading what
    comes before, and members are walked header to header. A non-seekable object is read
    with tarfile's stream mode from the start."""

    def __init__(self, name: str, opener: Callable[[], object]):
        self.name, self.opener = name, opener

    def read(self, stream, start):
        try:
            fileobj = self.opener()
        except FileNotFoundError as e:
            raise DataSourceError(f"data source file not found: {self.name}") from e
        except Exception as e:
            raise DataSourceError(f"cannot open {self.name}: {e}") from e
        with fileobj:
            seekable = getattr(fileobj, "seekable", lambda: False)()
            if seekable:
                fileobj.seek(start.member_offset)
                base = 0
            else:
                base = start.member_offset  # stream mode: skip by reading
                left = start.member_offset
                while left > 0:
                    skipped = len(fileobj.read(min(left, READ_CHUNK)))
                    if not skipped:
                        break
                    left -= skipped
            member_index = start.member_index
            try:
                tar = tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|")
            except tarfile.ReadError as e:
                if start.member_offset == 0 and _is_empty(fileobj):
                    log.warning("empty file skipped: %s", self.name)
                    return
                stream.bad.add(f"{self.name}@{start.member_offset}", f"not a readable tar ({e}); file skipped")
                return
            first = True
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as e:
                    stream.bad.add(
                        f"{self.name} after member {member_index}", f"truncated or damaged tar, rest skipped ({e})"
                    )
                    return
                if member is None:
                    if seekable and not _has_end_marker(fileobj, tar.offset):
                        stream.bad.add(f"{self.name} after member {member_index}", "truncated tar (no end-of-archive marker)")
                    return
                record0 = start.record if first else 0
                first = False
                if member.isfile() and _is_jsonl(member.name):
                    where = f"{self.name}[{member.name}]"
                    offset = base + member.offset
                    f = tar.extractfile(member)
                    chunks = zstd_chunks(f) if member.name.endswith(".zst") else plain_chunks(f)
                    yield from _jsonl_records(
                        stream, byte_lines(chunks), where, Cursor(start.shard, offset, member_index, record0),
                        start.shard, offset, member_index,
                    )
                member_index += 1


def _has_end_marker(fileobj, offset: int) -> bool:
    fileobj.seek(offset)
    tail = fileobj.read(1024)
    return len(tail) == 1024 and not tail.strip(b"\0")


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
            raise DataSourceError(f"cannot open dataset {self.name!r} (split {self.split!r}): {type(e).__name__}: {e}") from e
        if start.record:
            ds = ds.skip(start.record)
        column = stream.text_column
        for row, example in enumerate(ds, start.record):
            index = stream.index
            stream.index += 1
            if index % stream.stride != stream.offset:
                continue
            text = document_text(example, column)
            if text is None:
                stream.bad.add(f"{self.name}:example {row}", f"no text in column {column!r}")
                continue
            yield Cursor(start.shard, 0, 0, row, index), text


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


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    local_suffix = source.lower().endswith((".jsonl", ".zst", ".json", ".parquet", ".txt", ".tar"))
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")) and not local_suffix


def local_shards(source: str | Path) -> list[Shard]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataSourceError(f"data source not found: {source}")
    if path.is_file():
        shard = local_shard(path)
        if shard is None:
            raise DataSourceError(f"data source {source}: unsupported file type (use .jsonl, .jsonl.zst, .parquet, .txt or .tar)")
        return [shard]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    shards = [s for s in map(local_shard, files) if s is not None]
    if not shards:
        raise DataSourceError(f"data source folder {source} holds no .jsonl, .jsonl.zst, .parquet, .txt or .tar files")
    return shards


def hub_shards(repo_id: str, split: str = "train") -> list[Shard]:
    """A hub repository holding tar archives is read through HfFileSystem; any other dataset
    (or one whose listing fails) streams through `datasets`."""
    try:
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
        tars = sorted(p for p in fs.find(f"datasets/{repo_id}") if p.endswith(".tar"))
    except Exception as e:  # offline, private, or not a dataset repo: let `datasets` say why
        log.info("listing hub dataset %s failed (%s); using datasets streaming", repo_id, e)
        tars = []
    if tars:
        return [TarShard(f"hf://{t}", lambda t=t: fs.open(t, "rb", block_size=8 << 20)) for t in tars]
    return [HubDatasetShard(repo_id, split)]


def resolve_shards(source: str, split: str = "train") -> list[Shard]:
    """A source name -> shards: `hub:<id or folder>` forces `datasets`; an existing path (or
    anything that looks like one) is local; otherwise a hub dataset id."""
    source = SOURCE_ALIASES.get(source, source)
    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX):]
        if os.path.isdir(name) or not _looks_like_hub_id(name):
            if not os.path.exists(name):
                raise DataSourceError(f"data source not found: {name}")
            return [HubDatasetShard(name, split)]
        return hub_shards(name, split)
    if os.path.exists(source) or not _looks_like_hub_id(source):
        return local_shards(source)
    return hub_shards(source, split)


# ---- the stream ----------------------------------------------------------------------------


class DocumentStream:
    """The documents of a list of shards, in order, for reader `offset` of `stride`."""

    def __init__(self, shards: list[Shard], text_column: str = "text", stride: int = 1, offset: int = 0,
                 bad: BadRecords | None = None, name: str = ""):
        if not 0 <= offset < stride:
            raise ValueError(f"reader offset {offset} is not in [0, {stride})")
        self.shards, self.text_column, self.stride, self.offset = shards, text_column, stride, offset
        self.bad = bad if bad is not None else BadRecords()
        self.name = name or ", ".join(s.name for s in shards[:3]) + (" ..." if len(shards) > 3 else "")
        self.index = 0

    def __iter__(self) -> Iterator[tuple[Cursor, str]]:
        return self.iter_from(Cursor())

    def iter_from(self, cursor: Cursor) -> Iterator[tuple[Cursor, str]]:
        """(cursor, text) of each document from `cursor` on (that record first) to the end."""
        cursor = Cursor(*cursor)
        self.index = cursor.index
        for s in range(cursor.shard, len(self.shards)):
            start = cursor if s == cursor.shard else Cursor(shard=s, index=self.index)
            yield from self.shards[s].read(self, start)

    def texts(self) -> Iterator[str]:
        for _, text in self:
            yield text


def open_stream(source: str, text_column: str = "text", stride: int = 1, offset: int = 0,
                split: str = "train", bad: BadRecords | None = None) -> DocumentStream:
    return DocumentStream(resolve_shards(source, split), text_column, stride, offset, bad, name=source)


def read_jsonl(path: str | Path, text_column: str = "text") -> Iterator[str]:
    """Documents of a `.jsonl` or `.jsonl.zst` file (or any local source), in order."""
    return DocumentStream(local_shards(path), text_column).texts()
