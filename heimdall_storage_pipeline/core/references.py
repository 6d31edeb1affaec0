"""Reading reference sources: one read-only, repeatable-read snapshot, streamed from PostgreSQL.

Two ways to read a source, with the same result (pinned by ``tests/core/test_references.py``):

- the general path: a server-side cursor, each value normalised by ``normalise_source_values``;
- the fast path, for a psycopg2 connection and a first column of a string type (or ``jsonb``
  for ``container: json``): ``COPY (...) TO STDOUT`` inside the same snapshot, cut into Arrow
  arrays as it streams in, and normalised a block at a time (``core/native.py``). Only
  the rare values that need work (``//``, a leading ``/``, ``.`` segments, control characters,
  ``%`` when decoding, a foreign prefix, ...) go through the per-value Python path, in order, so
  counts, keys and the unparseable sample are exactly those of the general path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from heimdall_storage_pipeline.core.clock import Clock, utc_now
from heimdall_storage_pipeline.core.distinct import DistinctCounter
from heimdall_storage_pipeline.core.errors import ReferenceDatabaseError, database_url, redact
from heimdall_storage_pipeline.core.keys import (
    NEEDS_NORMALISATION_PATTERN,
    ParsedKind,
    ReferenceFormat,
    canonical_prefix,
    expand_container,
    parse_reference,
)
from heimdall_storage_pipeline.core.manifests import REFERENCES_SCHEMA, ManifestStore, in_background
from heimdall_storage_pipeline.core.native import (
    all_plain,
    copy_applies,
    copy_blocks,
    object_values,
    plain_keys,
    split_rows,
)
from heimdall_storage_pipeline.core.policy import DEFAULT_STATEMENT_TIMEOUT, BucketPolicy, ReferenceSource

FETCH_ROWS = 10_000  # rows per server-side cursor fetch
SAMPLE_SIZE = 10
_SAMPLE_VALUE_CHARS = 200

# Fast path (COPY + Arrow). PostgreSQL type OIDs psycopg2 returns as ``str``: text, varchar,
# bpchar (padded, in both paths alike) and name.
_STRING_OIDS = frozenset({25, 1043, 1042, 19})
_JSON_OID = 114
_JSONB_OID = 3802
_COPY_BLOCK_BYTES = 4 << 20  # rows handled per batch: ~60k URIs, bounded memory
# The references manifest is read once, by the diff, and pruned later: fast to write beats
# small (uncompressed: ~3x the size of zstd, half the write time). Keys are unique, so a
# dictionary for them is wasted work; the source name repeats, so it keeps one.
REFERENCES_PARQUET = {"compression": "none", "use_dictionary": ["source"], "write_statistics": ["source"]}
_QUEUED_BLOCKS = 8  # blocks COPY may run ahead of the caller
_PIPE_BYTES = 1 << 20  # the default pipe-max-size for unprivileged processes
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, absent from Python < 3.10's fcntl on some builds
_MAX_SLICE = 1 << 30
_COLUMN = "heimdall_ref"
# A batch with more slow rows than this share is normalised wholly in Python: interleaving
# many tiny vectorised runs would cost more than it saves.
_SLOW_SHARE = 1 / 64

def make_engine(url: str, statement_timeout: timedelta = DEFAULT_STATEMENT_TIMEOUT) -> Engine:
    """An engine whose every statement has a time limit; ``postgresql://`` means psycopg2 here."""
    try:
        parsed = database_url(url)
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg2")
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args={
            "connect_timeout": 10, "options": f"-c statement_timeout={int(statement_timeout.total_seconds() * 1000)}"})
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ReferenceDatabaseError(
            redact(f"HEIMDALL_DATABASE_URL is not a valid SQLAlchemy URL ({exc}); use "
                   f"postgresql+psycopg2://user:password@host:5432/heimdall")
        ) from None
    sa.event.listen(engine, "connect", _cancel_when_the_client_is_gone)
    return engine


def _cancel_when_the_client_is_gone(dbapi_connection: Any, _: object) -> None:
    """PostgreSQL 14+ cancels a query whose client died (a killed run) instead of running it to its timeout."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('server_version_num')::int >= 140000")
        if cursor.fetchone()[0]:
            cursor.execute("SET client_connection_check_interval = '2s'")
    dbapi_connection.commit()


def describe_engine(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def read_only_snapshot(engine: Engine) -> Iterator[Connection]:
    """A read-only REPEATABLE READ transaction: every query sees the same snapshot."""
    where = describe_engine(engine)
    try:
        with engine.connect() as connection:
            connection = connection.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            with connection.begin():
                yield connection
    except sa.exc.OperationalError as exc:
        raise ReferenceDatabaseError(
            redact(f"cannot read the reference database at {where}: {_first_line(exc)}; check "
                   f"HEIMDALL_DATABASE_URL and that the server is running")
        ) from None
    except sa.exc.ProgrammingError as exc:
        raise ReferenceDatabaseError(
            redact(f"a reference query failed on {where}: {_first_line(exc)}; fix the query in the "
                   f"storage policy (a renamed table or column?)")
        ) from None


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    return str(original).strip().splitlines()[0] if str(original).strip() else type(original).__name__


def stream_source_values(connection: Connection, source: ReferenceSource) -> Iterator[object]:
    """Yield the first column of ``source.query`` through a server-side cursor."""
    result = connection.execution_options(stream_results=True, max_row_buffer=FETCH_ROWS).execute(
        sa.text(source.query)
    )
    for partition in result.partitions(FETCH_ROWS):
        for row in partition:
            yield row[0]


@dataclass
class ReferenceCounts:
    reference_rows: int = 0  # values read, after expanding JSON containers
    other_bucket: int = 0
    unparseable: int = 0
    unparseable_sample: list[str] = field(default_factory=list)

    def note_unparseable(self, source: str, value: object, problem: str) -> None:
        self.unparseable += 1
        if len(self.unparseable_sample) < SAMPLE_SIZE:
            shown = repr(value)[:_SAMPLE_VALUE_CHARS]
            self.unparseable_sample.append(f"{source}: {shown} ({problem})")


def normalise_source_values(
    bucket: BucketPolicy, source: ReferenceSource, values: Iterable[object], counts: ReferenceCounts
) -> Iterator[str]:
    """Keys of ``bucket`` named by ``values``; other buckets and bad values are only counted."""
    for value in values:
        if value is None:
            continue
        for item in expand_container(value, source.container):
            if item is None:
                continue
            counts.reference_rows += 1
            parsed = parse_reference(item, bucket.name, source.format, percent_decode=source.percent_decode)
            if parsed.kind is ParsedKind.KEY:
                yield parsed.key
            elif parsed.kind is ParsedKind.OTHER_BUCKET:
                counts.other_bucket += 1
            else:
                counts.note_unparseable(source.name, item, parsed.problem)


# --- vectorised normalisation ---------------------------------------------------------------


def _as_string_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if values.type == pa.large_string():
        values = values.cast(pa.string())
    return values


def _strip_prefix(values: pa.Array, length: int) -> pa.Array:
    """``value[length:]`` in bytes; only meaningful (valid UTF-8) where the ASCII prefix is present."""
    if length == 0:
        return values
    # binary_slice is several times faster than utf8_slice_codeunits; the view skips a UTF-8
    # validation whose failures (rows without the prefix) are masked out by the caller anyway.
    return pc.binary_slice(values.view(pa.binary()), length, _MAX_SLICE).view(pa.string())


def _foreign_bucket_mask(values: pa.Array, bucket: str, fmt: ReferenceFormat) -> pa.Array:
    """True where ``parse_reference`` would report another bucket (same rules, as RE2 patterns)."""
    escaped = re.escape(bucket)
    if fmt is ReferenceFormat.URI:
        # text.lower().startswith("s3://"), then text[5:].partition("/") with a non-empty bucket.
        named = pc.match_substring_regex(values, r"^[sS]3://[^/]+/")
        ours = pc.match_substring_regex(values, rf"^[sS]3://{escaped}/")
    elif fmt is ReferenceFormat.BUCKET_KEY:
        # Values with a leading '/' are left to the Python path (it strips them first).
        named = pc.match_substring_regex(values, r"^[^/]+/")
        ours = pc.starts_with(values, f"{bucket}/")
    else:
        return pa.array(np.zeros(len(values), dtype=bool))
    return pc.and_(named, pc.invert(ours))


def normalise_string_array(
    bucket: BucketPolicy, source: ReferenceSource, values: pa.Array | pa.ChunkedArray, counts: ReferenceCounts
) -> pa.Array:
    """``normalise_source_values`` for scalar string values (``container: none``), vectorised.

    Returns the keys in input order and updates ``counts`` exactly as the per-value path does.
    Values already in normal form are handled by Arrow kernels; the rest are handed, in order,
    to ``normalise_source_values``.
    """
    values = _as_string_array(values)
    if values.null_count:
        values = values.drop_null()  # NULLs are skipped, not counted
    if len(values) == 0:
        return pa.array([], pa.string())
    counts.reference_rows += len(values)
    fmt = ReferenceFormat(source.format)
    prefix = canonical_prefix(bucket.name, fmt)
    pattern = NEEDS_NORMALISATION_PATTERN + ("|%" if source.percent_decode else "")
    if (not prefix or pc.all(pc.starts_with(values, prefix)).as_py()) and all_plain(
        values, len(prefix), "%" if source.percent_decode else ""
    ):
        return _strip_prefix(values, len(prefix))  # the usual block: prefix + a key in normal form
    rest = _strip_prefix(values, len(prefix))
    fast = pc.and_(pc.invert(pc.match_substring_regex(rest, pattern)), pc.greater(pc.binary_length(rest), 0))
    if prefix:
        fast = pc.and_(pc.starts_with(values, prefix), fast)
    if pc.all(fast).as_py():
        return rest
    slow_rows = pc.indices_nonzero(pc.invert(fast))
    others = values.take(slow_rows)
    foreign = _foreign_bucket_mask(others, bucket.name, fmt)
    counts.other_bucket += pc.sum(foreign).as_py() or 0
    slow_rows = slow_rows.filter(pc.invert(foreign))
    slow_mask = np.zeros(len(values), dtype=bool)
    slow_mask[slow_rows.to_numpy()] = True
    replacements = _slow_keys(bucket, source, values.take(slow_rows).to_pylist(), counts)
    keys = pc.if_else(fast, rest, pa.scalar(None, pa.string()))
    if replacements:
        keys = pc.replace_with_mask(keys, pa.array(slow_mask), pa.array(replacements, pa.string()))
    return keys.drop_null()


def _slow_keys(
    bucket: BucketPolicy, source: ReferenceSource, values: list[str], counts: ReferenceCounts
) -> list[str | None]:
    """The per-value path, one result (key or None) per value; ``reference_rows`` is already counted."""
    scalar = source if source.container == "none" else _scalar_source(source)
    keys: list[str | None] = []
    for value in values:
        before = counts.reference_rows
        found = list(normalise_source_values(bucket, scalar, (value,), counts))
        counts.reference_rows = before
        keys.append(found[0] if found else None)
    return keys


def _scalar_source(source: ReferenceSource) -> ReferenceSource:
    return ReferenceSource(
        name=source.name, query=source.query, format=source.format, container="none",
        percent_decode=source.percent_decode,
    )


def normalise_jsonb_array(
    bucket: BucketPolicy, source: ReferenceSource, texts: pa.Array | pa.ChunkedArray, counts: ReferenceCounts
) -> pa.Array:
    """``normalise_source_values`` for ``jsonb`` values as PostgreSQL prints them (``container: json``).

    Objects whose members are all plain strings are expanded without decoding
    (``native.object_values``); any other value is decoded as psycopg2 would (``json.loads``)
    and takes the per-value path.
    """
    texts = _as_string_array(texts)
    if texts.null_count:
        texts = texts.drop_null()
    if len(texts) == 0:
        return pa.array([], pa.string())
    values, members = object_values(texts)
    scalar = _scalar_source(source)
    slow_rows = np.flatnonzero(members < 0)
    if len(slow_rows) > len(texts) * _SLOW_SHARE:
        decoded = (json.loads(text) for text in texts.to_pylist())
        return pa.array(list(normalise_source_values(bucket, source, decoded, counts)), pa.string())
    if len(slow_rows) == 0:
        return normalise_string_array(bucket, scalar, values, counts)
    # Vectorised runs of simple objects between the few other values, in input order.
    ends = np.concatenate(([0], np.cumsum(np.maximum(members, 0))))  # where each row's values end
    parts: list[pa.Array] = []
    start = 0
    for row in slow_rows.tolist():
        if row > start:
            parts.append(normalise_string_array(bucket, scalar, values.slice(ends[start], ends[row] - ends[start]),
                                                counts))
        decoded = json.loads(texts[row].as_py())
        parts.append(pa.array(list(normalise_source_values(bucket, source, (decoded,), counts)), pa.string()))
        start = row + 1
    if start < len(texts):
        parts.append(normalise_string_array(bucket, scalar, values.slice(ends[start]), counts))
    return pa.concat_arrays(parts)


# --- COPY fast path -------------------------------------------------------------------------


def _dbapi_connection(connection: Connection) -> Any | None:
    """The psycopg2 connection under ``connection`` when the fast path applies to it."""
    if connection.dialect.driver != "psycopg2":
        return None
    raw = connection.connection.driver_connection
    # COPY output is in the client encoding; Arrow reads UTF-8 only.
    return raw if getattr(raw, "encoding", None) == "UTF8" else None


def _wrapped(query: str, columns: int) -> str:
    # Fresh names for every column select the first one whatever the columns are called (even
    # duplicates); the newlines keep a trailing '--' comment from swallowing the parenthesis.
    names = ", ".join(f"{_COLUMN}_{index}" for index in range(columns))
    return f"SELECT {_COLUMN}_0 FROM (\n{query}\n) AS heimdall_refs({names})"


def _raise_as_sqlalchemy(sql: str, exc: BaseException) -> None:
    """Re-raise a psycopg2 error as the SQLAlchemy error the general path would have raised."""
    import psycopg2

    if isinstance(exc, psycopg2.Error):
        raise sa.exc.DBAPIError.instance(sql, None, exc, psycopg2.Error) from exc
    raise exc


def _describe(raw: Any, query: str) -> tuple[int, int]:
    """The number of columns of ``query`` and the type OID of its first."""
    sql = f"SELECT * FROM (\n{query}\n) AS heimdall_refs LIMIT 0"
    try:
        with raw.cursor() as cursor:
            cursor.execute(sql)
            return len(cursor.description), int(cursor.description[0].type_code)
    except Exception as exc:  # translated, not swallowed
        _raise_as_sqlalchemy(sql, exc)
        raise


def _has_bind_parameters(query: str) -> bool:
    # The general path runs the query through sa.text, where ':name' is a bind parameter (and
    # so an error); such a query keeps that path and its behaviour.
    return bool(sa.text(query).compile().params)


def _grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):  # a smaller pipe only means more context switches
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", _F_SETPIPE_SZ), _PIPE_BYTES)


def copy_column_batches(raw: Any, query: str, columns: int = 1) -> Iterator[pa.Array]:
    """The first of the ``columns`` columns of ``query`` as Arrow string arrays (``copy_row_blocks``)."""
    return (_text_rows(block, rows_end) for block, rows_end in copy_row_blocks(raw, query, columns))


def copy_row_blocks(raw: Any, query: str, columns: int = 1) -> Iterator[tuple[bytearray, int]]:
    """Blocks of whole rows of the first of the ``columns`` columns of ``query``, read by ``COPY ... TO STDOUT``.

    COPY runs on ``raw`` (inside its current transaction, so in the caller's snapshot) in a
    background thread that queues a few blocks ahead, so COPY never waits for the caller's
    work on a block and memory stays at a few blocks. Where it can (``native.copy_applies``)
    compiled code fills the blocks row by row; otherwise psycopg2's ``copy_expert`` writes
    into a pipe and a second thread cuts what arrives into blocks. Text format, one column:
    every newline ends a row (newlines in values are escaped), so a block becomes an Arrow
    array by locating its newlines; only rows holding a backslash (an escape, or ``\\N`` for
    NULL) need decoding (``_text_rows``). Yields ``(block, rows_end)``: the rows are
    ``block[:rows_end]``.
    """
    sql = f"COPY ({_wrapped(query, columns)}) TO STDOUT"
    copy_failures: list[BaseException] = []
    read_failures: list[BaseException] = []
    blocks: queue.Queue[tuple[bytearray | None, int] | None] = queue.Queue(maxsize=_QUEUED_BLOCKS)
    stopping = threading.Event()

    def deliver(block: bytearray, rows_end: int) -> bool:
        blocks.put((block, rows_end))
        return not stopping.is_set()

    def copy_natively() -> None:
        try:
            copy_blocks(raw, sql, _COPY_BLOCK_BYTES, deliver)
        except BaseException as exc:  # handed to the calling thread
            copy_failures.append(exc)
        finally:
            blocks.put(None)

    if copy_applies(raw):
        threads = [threading.Thread(target=copy_natively, name="heimdall-references-copy", daemon=True)]
        threads[0].start()
    else:
        threads = _start_piped_copy(raw, sql, blocks, stopping, copy_failures, read_failures)
    truncated = False
    item = blocks.get()
    try:
        while item is not None:
            block, rows_end = item
            if block is None:
                truncated = True
            else:
                yield block, rows_end
            item = blocks.get()
    finally:
        stopping.set()
        while item is not None:  # unblock the producer until it has finished
            item = blocks.get()
        for thread in threads:
            thread.join()
    if copy_failures:  # a COPY that failed half-way truncates the stream: its error is the one to report
        _raise_as_sqlalchemy(sql, copy_failures[0])
    if read_failures:
        raise read_failures[0]
    if truncated:
        raise ReferenceDatabaseError(f"the COPY output of {query!r} ended inside a row")


def _start_piped_copy(
    raw: Any, sql: str, blocks: queue.Queue[tuple[bytearray | None, int] | None], stopping: threading.Event,
    copy_failures: list[BaseException], read_failures: list[BaseException],
) -> list[threading.Thread]:
    """Start psycopg2's ``copy_expert`` writing into a pipe, and a thread cutting the pipe into blocks."""
    read_fd, write_fd = os.pipe()
    _grow_pipe(write_fd)

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb", buffering=_PIPE_BYTES) as sink, raw.cursor() as cursor:
                cursor.copy_expert(sql, sink)
        except BaseException as exc:  # handed to the calling thread
            copy_failures.append(exc)

    def cut() -> None:
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as source:  # closing it stops a producer on EPIPE
                for item in _row_blocks(source):
                    blocks.put(item)
                    if stopping.is_set():
                        break
        except BaseException as exc:  # handed to the calling thread
            read_failures.append(exc)
        finally:
            blocks.put(None)

    producer = threading.Thread(target=produce, name="heimdall-references-copy", daemon=True)
    cutter = threading.Thread(target=cut, name="heimdall-references-rows", daemon=True)
    try:
        producer.start()
    except BaseException:
        os.close(write_fd)
        os.close(read_fd)
        raise
    cutter.start()
    return [producer, cutter]


def _row_blocks(source: Any) -> Iterator[tuple[bytearray | None, int]]:
    """Blocks of about ``_COPY_BLOCK_BYTES`` from ``source``, each with the end of its last whole row;
    ``(None, 0)`` last if the stream ends inside a row (which only a failed COPY does)."""
    carry = b""
    size = _COPY_BLOCK_BYTES
    while True:
        block = bytearray(max(size, 2 * len(carry)))
        block[: len(carry)] = carry
        filled = len(carry)
        view = memoryview(block)
        while filled < len(block):
            read = source.readinto(view[filled:])
            if not read:
                break
            filled += read
        view.release()
        rows_end = block.rfind(b"\n", 0, filled) + 1
        if filled < len(block):  # end of stream
            if rows_end:
                yield block, rows_end
            if rows_end < filled:
                yield None, 0
            return
        if rows_end == 0:  # a row longer than a block: read on into a bigger one
            carry, size = bytes(block), 2 * len(block)
            continue
        carry = bytes(block[rows_end:filled])
        yield block, rows_end


def _text_rows(block: bytearray, rows_end: int) -> pa.Array:
    """The rows of ``block[:rows_end]`` (COPY text format, one column) as a string array."""
    values = split_rows(block, rows_end)
    if block.find(b"\\", 0, rows_end) < 0:
        return values
    escaped = pc.match_substring(values, "\\")
    rows = pc.indices_nonzero(escaped)
    decoded = [_decode_copy_text(text) for text in values.take(rows).to_pylist()]
    return pc.replace_with_mask(values, escaped, pa.array(decoded, pa.string()))


_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_COPY_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _decode_copy_text(text: str) -> str | None:
    """One field of COPY text output: ``\\N`` is NULL, other escapes stand for one character."""
    if text == "\\N":
        return None
    return _COPY_ESCAPE.sub(lambda match: _COPY_ESCAPES.get(match.group(1), match.group(1)), text)


KeyBatch = tuple[pa.Array, np.ndarray | None]  # keys, and their hash_strings64 when already computed


def _fast_source_keys(
    connection: Connection, bucket: BucketPolicy, source: ReferenceSource, counts: ReferenceCounts
) -> Iterator[KeyBatch] | None:
    """Key arrays of ``source`` through COPY, or None when only the general path applies."""
    raw = _dbapi_connection(connection)
    if raw is None or _has_bind_parameters(source.query):
        return None
    columns, oid = _describe(raw, source.query)
    if source.container == "none" and oid in _STRING_OIDS:
        return _plain_source_keys(raw, bucket, source, columns, counts)
    if source.container == "json" and oid == _JSONB_OID:
        convert = normalise_jsonb_array
    elif source.container == "json" and oid in _STRING_OIDS:
        # JSON text: each value is a str, exactly as psycopg2 would return it.
        def convert(b: BucketPolicy, s: ReferenceSource, texts: pa.Array, c: ReferenceCounts) -> pa.Array:
            return pa.array(list(normalise_source_values(b, s, texts.to_pylist(), c)), pa.string())
    elif source.container == "json" and oid == _JSON_OID:
        def convert(b: BucketPolicy, s: ReferenceSource, texts: pa.Array, c: ReferenceCounts) -> pa.Array:
            decoded = (None if text is None else json.loads(text) for text in texts.to_pylist())
            return pa.array(list(normalise_source_values(b, s, decoded, c)), pa.string())
    else:
        return None
    return ((convert(bucket, source, values, counts), None)
            for values in copy_column_batches(raw, source.query, columns))


def _plain_source_keys(
    raw: Any, bucket: BucketPolicy, source: ReferenceSource, columns: int, counts: ReferenceCounts
) -> Iterator[KeyBatch]:
    """Scalar string values: a block of plain values in one compiled pass, any other vectorised."""
    prefix = canonical_prefix(bucket.name, ReferenceFormat(source.format))
    extra = "%" if source.percent_decode else ""
    for block, rows_end in copy_row_blocks(raw, source.query, columns):
        plain = plain_keys(block, rows_end, prefix, extra)
        if plain is not None:
            counts.reference_rows += len(plain[0])
            yield plain
        else:
            yield normalise_string_array(bucket, source, _text_rows(block, rows_end), counts), None


def _general_source_keys(
    connection: Connection, bucket: BucketPolicy, source: ReferenceSource, counts: ReferenceCounts
) -> Iterator[KeyBatch]:
    chunk: list[str] = []
    for key in normalise_source_values(bucket, source, stream_source_values(connection, source), counts):
        chunk.append(key)
        if len(chunk) >= FETCH_ROWS * 5:
            yield pa.array(chunk, pa.string()), None
            chunk = []
    yield pa.array(chunk, pa.string()), None


def source_key_arrays(
    connection: Connection, bucket: BucketPolicy, source: ReferenceSource, counts: ReferenceCounts
) -> Iterator[KeyBatch]:
    """The keys ``source`` names, as Arrow arrays (with their hashes when the read computed them):
    through COPY when it applies, else a cursor."""
    fast = _fast_source_keys(connection, bucket, source, counts)
    return fast if fast is not None else _general_source_keys(connection, bucket, source, counts)


@dataclass(frozen=True)
class ReferencesResult:
    bucket: str
    referenced_count: int  # distinct keys of this bucket
    reference_rows: int
    other_bucket_reference_count: int
    unparseable_reference_count: int
    unparseable_sample: list[str]
    snapshot_at: datetime
    manifest_uri: str
    read_seconds: float


def read_references_to_manifest(
    engine: Engine,
    bucket: BucketPolicy,
    store: ManifestStore,
    run_id: str,
    clock: Clock = utc_now,
) -> ReferencesResult:
    """Read every reference source of ``bucket`` in one snapshot into a references manifest."""
    counts = ReferenceCounts()
    began = time.perf_counter()
    distinct = DistinctCounter()  # counted as the keys pass: no second read, no copy of the keys
    with read_only_snapshot(engine) as connection:
        # The snapshot is taken by the first statement; the clock is read just before it,
        # so snapshot_at never claims a later moment than the snapshot really has.
        snapshot_at = clock()
        connection.execute(sa.text("SELECT 1"))
        uri = store.new_uri("references", bucket.name, snapshot_at, run_id)
        with store.writer(uri, REFERENCES_SCHEMA, **REFERENCES_PARQUET) as parquet, in_background(parquet) as writer:
            for source in bucket.references:
                for keys, hashes in source_key_arrays(connection, bucket, source, counts):
                    if len(keys):
                        writer.write_batch(_references_batch(keys, source.name))
                        distinct.add(keys, hashes)
            referenced_count = distinct.count  # sorts while the writer thread finishes the manifest
    return ReferencesResult(
        bucket=bucket.name,
        referenced_count=referenced_count,
        reference_rows=counts.reference_rows,
        other_bucket_reference_count=counts.other_bucket,
        unparseable_reference_count=counts.unparseable,
        unparseable_sample=counts.unparseable_sample,
        snapshot_at=snapshot_at,
        manifest_uri=uri,
        read_seconds=time.perf_counter() - began,
    )


def _references_batch(keys: pa.Array | list[str], source: str) -> pa.RecordBatch:
    keys = keys if isinstance(keys, pa.Array) else pa.array(keys, pa.string())
    sources = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(keys), dtype=np.int32)), pa.array([source]))
    return pa.record_batch([keys, sources], schema=REFERENCES_SCHEMA)
