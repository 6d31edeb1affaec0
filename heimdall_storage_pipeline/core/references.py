"""Reading reference sources: every source of a bucket in one read-only REPEATABLE READ snapshot.

The scan reads through ADBC's PostgreSQL driver, which streams each query with ``COPY`` (binary)
straight into Arrow. Values are normalised with Arrow kernels: those already in normal form
(nearly all) in bulk, the few others one by one through ``normalise_source_values``, in order,
so keys, counts and the unparseable sample are exactly those of the per-value path that the
deletion-time re-check runs on psycopg2's values (``core/revalidation.py``).
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlencode

import adbc_driver_manager
import adbc_driver_postgresql.dbapi as adbc
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from heimdall_storage_pipeline.core.clock import Clock, utc_now
from heimdall_storage_pipeline.core.errors import ReferenceDatabaseError, database_url, redact, source_fix
from heimdall_storage_pipeline.core.keys import (
    ParsedKind,
    ReferenceFormat,
    canonical_prefix,
    expand_container,
    parse_reference,
)
from heimdall_storage_pipeline.core.manifests import (
    REFERENCES_SCHEMA,
    BackgroundWriter,
    ManifestStore,
    in_background,
)
from heimdall_storage_pipeline.core.policy import DEFAULT_STATEMENT_TIMEOUT, BucketPolicy, ReferenceSource

FETCH_ROWS = 10_000  # rows per server-side cursor fetch (the re-check's reads)
SAMPLE_SIZE = 10
_SAMPLE_VALUE_CHARS = 200
CONNECT_TIMEOUT_SECONDS = 10
# The references manifest is read once, by the diff, and pruned later: fast to write beats
# small. Keys are unique, so a dictionary for them is wasted work; the source name repeats.
REFERENCES_PARQUET = {"compression": "none", "use_dictionary": ["source"], "write_statistics": ["source"]}
# The distinct count: one thread (PostgreSQL and the read hold the other cores), and a memory
# limit past which its hash table spills, so memory stays flat at any number of keys.
DISTINCT_CONFIG = {"threads": 1, "memory_limit": "128MB", "preserve_insertion_order": False}
_KEYS = pa.schema([("key", pa.string())])
# Bytes per Arrow batch ADBC reads, and batches read ahead of the normalisation: with
# the writer's queue, they bound the read's memory.
BATCH_BYTES = 1 << 20
AHEAD = 2
_COLUMN = "heimdall_ref"
_MAX_SLICE = 1 << 30
# A batch with more JSON values than this share outside the simple shape goes wholly through
# Python: many tiny vectorised runs between them would cost more than they save.
_SLOW_SHARE = 1 / 64
_CONTROL = r"[\x00-\x1f\x7f]"
_QUERY_CANCELED = "57014"
_SERVER_ERROR = "XX000"  # a query error the server reported, of unknown kind
_ADBC_ERRORS = (adbc_driver_manager.Error, pa.ArrowException, OSError)


def make_engine(url: str, statement_timeout: timedelta = DEFAULT_STATEMENT_TIMEOUT) -> Engine:
    """An engine whose every statement has a time limit; ``postgresql://`` means psycopg2 here."""
    try:
        parsed = database_url(url)
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg2")
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args={
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "options": f"-c statement_timeout={int(statement_timeout.total_seconds() * 1000)}"})
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
    """A read-only REPEATABLE READ transaction on SQLAlchemy (the re-check's reads)."""
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


def _strings(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``values`` as one string array without nulls (a null names nothing and is not counted)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if values.type != pa.string():
        values = values.cast(pa.string())
    return values.drop_null() if values.null_count else values


def _strip_prefix(values: pa.Array, length: int) -> pa.Array:
    """``value[length:]`` in bytes; only meaningful where the (ASCII) prefix is present."""
    if length == 0:
        return values
    # Sliced as binary: rows without the prefix may be cut mid-character, and are masked out.
    return pc.binary_slice(values.view(pa.binary()), length, _MAX_SLICE).view(pa.string())


def _offsets(values: pa.Array) -> np.ndarray:
    return np.frombuffer(values.buffers()[1], dtype=np.int32, count=len(values) + 1, offset=values.offset * 4)


def _matches(values: pa.Array, pattern: str) -> pa.Array:
    """``match_substring_regex`` per value, run only when the batch's bytes hold a match at all: a
    pattern that matches no value usually matches nowhere in their concatenation, one fast pass."""
    if len(values) == 0:
        return pa.array([], pa.bool_())
    offsets = _offsets(values)
    bounds = pa.py_buffer(np.array([offsets[0], offsets[-1]], dtype=np.int32))
    together = pa.Array.from_buffers(pa.binary(), 1, [None, bounds, values.buffers()[2] or pa.py_buffer(b"")])
    if not pc.match_substring_regex(together, pattern)[0].as_py():
        return pa.array(np.zeros(len(values), dtype=bool))
    return pc.match_substring_regex(values, pattern)


def _in_normal_form(keys: pa.Array, percent_decode: bool) -> pa.Array:
    """True where ``normalize_key`` leaves the key as it is (False may also mean only "maybe")."""
    # Printable ASCII holds no control character (the cheap test); other text takes the pattern.
    printable = pc.ascii_is_printable(keys)
    if not pc.all(printable).as_py():
        printable = pc.invert(_matches(keys, _CONTROL))
    plain = pc.and_(printable, pc.greater(pc.binary_length(keys), 0))
    # No leading '/', no '//' run, no '.' or '..' segment (each starts the key or follows a '/').
    odd = pc.or_(pc.or_(pc.starts_with(keys, "/"), pc.starts_with(keys, ".")),
                 _matches(keys, "/[/.]|%" if percent_decode else "/[/.]"))
    return pc.and_(plain, pc.invert(odd))


def _foreign_bucket_mask(values: pa.Array, bucket: str, fmt: ReferenceFormat) -> pa.Array:
    """True where ``parse_reference`` reports another bucket (its rules, as RE2 patterns)."""
    if fmt is ReferenceFormat.URI:
        named = pc.match_substring_regex(values, r"^[sS]3://[^/]+/")
        ours = pc.starts_with(values, f"s3://{bucket}/")
        ours = pc.or_(ours, pc.starts_with(values, f"S3://{bucket}/"))
    elif fmt is ReferenceFormat.BUCKET_KEY:
        # Values with a leading '/' are left to the per-value path (it strips them first).
        named = pc.match_substring_regex(values, r"^[^/]+/")
        ours = pc.starts_with(values, f"{bucket}/")
    else:
        return pa.array(np.zeros(len(values), dtype=bool))
    return pc.and_(named, pc.invert(ours))


def normalise_string_array(
    bucket: BucketPolicy, source: ReferenceSource, values: pa.Array | pa.ChunkedArray, counts: ReferenceCounts
) -> pa.Array:
    """``normalise_source_values`` for string values (``container: none``), vectorised.

    Returns the keys in input order and updates ``counts`` exactly as the per-value path does.
    """
    values = _strings(values)
    counts.reference_rows += len(values)
    fmt = ReferenceFormat(source.format)
    prefix = canonical_prefix(bucket.name, fmt)
    keys = _strip_prefix(values, len(prefix))
    fast = _in_normal_form(keys, source.percent_decode)
    if prefix:
        fast = pc.and_(pc.starts_with(values, prefix), fast)
    if pc.all(fast).as_py():  # also true for an empty batch
        return keys
    slow_rows = pc.indices_nonzero(pc.invert(fast))
    foreign = _foreign_bucket_mask(values.take(slow_rows), bucket.name, fmt)
    counts.other_bucket += pc.sum(foreign).as_py() or 0
    slow_rows = slow_rows.filter(pc.invert(foreign))
    slow_mask = np.zeros(len(values), dtype=bool)
    slow_mask[slow_rows.to_numpy()] = True
    slow_keys = [_one_key(bucket, source, value, counts) for value in values.take(slow_rows).to_pylist()]
    keys = pc.if_else(fast, keys, pa.scalar(None, pa.string()))
    if slow_keys:
        keys = pc.replace_with_mask(keys, pa.array(slow_mask), pa.array(slow_keys, pa.string()))
    return keys.drop_null()


def _one_key(bucket: BucketPolicy, source: ReferenceSource, value: str, counts: ReferenceCounts) -> str | None:
    """The per-value path for one scalar value already counted in ``reference_rows``."""
    counts.reference_rows -= 1
    return next(normalise_source_values(bucket, _scalar(source), (value,), counts), None)


@lru_cache(maxsize=64)
def _scalar(source: ReferenceSource) -> ReferenceSource:
    """``source`` for the values inside its containers, validated once (it runs per batch)."""
    return replace(source, container="none")


def normalise_json_array(
    bucket: BucketPolicy, source: ReferenceSource, texts: pa.Array | pa.ChunkedArray, counts: ReferenceCounts,
    decode: Callable[[str], object] | None = None,
) -> pa.Array:
    """``normalise_source_values`` for JSON texts (``container: json``), vectorised.

    ``decode`` turns a text into the value the per-value path is given: ``json.loads`` for a
    json or jsonb column (psycopg2 decodes those), None for a text column. Objects whose members
    are all plain strings, in jsonb's order (so without duplicate names), expand without
    decoding; any other value takes the per-value path, in order.
    """
    texts = _strings(texts)
    simple, values, lengths = _simple_objects(texts)
    slow_rows = np.flatnonzero(~simple)

    def per_value(rows: Iterable[int]) -> pa.Array:
        raw = texts.take(pa.array(list(rows), pa.int64())).to_pylist()
        decoded = raw if decode is None else [decode(text) for text in raw]
        return pa.array(list(normalise_source_values(bucket, source, decoded, counts)), pa.string())

    if len(slow_rows) > len(texts) * _SLOW_SHARE:
        return per_value(range(len(texts)))
    # Vectorised runs of simple objects between the few other values, in input order.
    ends = np.concatenate(([0], np.cumsum(lengths)))
    scalar = _scalar(source)
    parts: list[pa.Array] = []
    start = 0
    for row in [*slow_rows.tolist(), len(texts)]:
        if row > start:
            parts.append(normalise_string_array(bucket, scalar, values.slice(ends[start], ends[row] - ends[start]),
                                                counts))
        if row < len(texts):
            parts.append(per_value([row]))
        start = row + 1
    return parts[0] if len(parts) == 1 else pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def _spans(data: pa.Buffer, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    """The strings ``data[start:end]``, copied into one array (spans in increasing order)."""
    if len(starts) == 0:
        return pa.array([], pa.string())
    bounds = np.empty(2 * len(starts), dtype=np.int32)
    bounds[0::2], bounds[1::2] = starts, ends  # each span, then the gap up to the next one
    both = pa.Array.from_buffers(pa.string(), len(bounds) - 1, [None, pa.py_buffer(bounds), data])
    return both.take(pa.array(np.arange(0, len(bounds), 2)))


def _simple_objects(texts: pa.Array) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Which texts are ``{"k": "v", "k2": "v2"}`` (string members without escapes or control
    characters, names in jsonb's strictly increasing order: byte length, then bytes), those
    objects' values in order, and each text's number of them (0 for the others).

    Found from the positions of the batch's '"' bytes: such an object has four per member, with
    exactly ``: `` between a name and its value and ``, `` between members.
    """
    rows = len(texts)
    offsets = _offsets(texts)
    data = texts.buffers()[2] or pa.py_buffer(b"")
    raw = np.frombuffer(data, dtype=np.uint8)
    printable = pc.ascii_is_printable(texts)
    clean = printable if pc.all(printable).as_py() else pc.invert(_matches(texts, r"[\x00-\x1f]"))
    plain = pc.and_(pc.and_(pc.starts_with(texts, '{"'), pc.ends_with(texts, '"}')),
                    pc.and_(clean, pc.invert(_matches(texts, r"\\"))))
    plain = plain.to_numpy(zero_copy_only=False) if rows else np.zeros(0, dtype=bool)
    quotes = np.flatnonzero(raw[offsets[0]:offsets[-1]] == ord('"')) + offsets[0]
    per_row = np.diff(np.searchsorted(quotes, offsets))
    plain &= per_row % 4 == 0
    if not plain.all():
        quotes = quotes[np.repeat(plain, per_row)]
    quads = quotes.reshape(-1, 4)  # per member: the quotes around its name and its value
    member_rows = np.repeat(np.arange(rows), np.where(plain, per_row // 4, 0))
    ok = (quads[:, 2] == quads[:, 1] + 3) & (raw[quads[:, 1] + 1] == ord(":")) & (raw[quads[:, 1] + 2] == ord(" "))
    inner = np.flatnonzero(member_rows[:-1] == member_rows[1:])  # members followed by one of their object
    name_lengths = quads[:, 1] - quads[:, 0]
    follows = (quads[inner + 1, 0] == quads[inner, 3] + 3) & (raw[quads[inner, 3] + 1] == ord(",")) & (
        raw[quads[inner, 3] + 2] == ord(" "))
    names = _spans(data, quads[:, 0] + 1, quads[:, 1])
    if len(inner):
        before = pc.less(names.slice(0, len(names) - 1), names.slice(1)).to_numpy(zero_copy_only=False)[inner]
        first, second = name_lengths[inner], name_lengths[inner + 1]
        ok[inner] &= follows & ((first < second) | ((first == second) & before))
    plain[member_rows[~ok]] = False
    keep = plain[member_rows]
    quads = quads[keep] if not keep.all() else quads
    return plain, _spans(data, quads[:, 2] + 1, quads[:, 3]), np.where(plain, per_row // 4, 0)


def _python_keys(bucket: BucketPolicy, source: ReferenceSource, values: list[Any], counts: ReferenceCounts) -> pa.Array:
    return pa.array(list(normalise_source_values(bucket, source, values, counts)), pa.string())


def source_keys(bucket: BucketPolicy, source: ReferenceSource, values: pa.Array, counts: ReferenceCounts) -> pa.Array:
    """The keys named by one batch of a source's first column, as ADBC typed it."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):  # text, varchar, char, name
        if source.container == "json":
            return normalise_json_array(bucket, source, values, counts)
        return normalise_string_array(bucket, source, values, counts)
    if isinstance(values.type, pa.JsonType):  # json, jsonb: psycopg2 hands the per-value path decoded JSON
        if source.container == "json":
            return normalise_json_array(bucket, source, values.storage, counts, decode=json.loads)
        return _python_keys(bucket, source, [None if text is None else json.loads(text)
                                             for text in values.storage.to_pylist()], counts)
    # Numbers, dates, UUIDs (SQLAlchemy's psycopg2 gives uuid.UUID), arrays, ...: not strings, so
    # unparseable, except an array's items with container: json.
    return _python_keys(bucket, source, values.to_pylist(), counts)


# --- reading through ADBC -------------------------------------------------------------------


def libpq_uri(url: sa.URL) -> str:
    """A libpq connection URI for SQLAlchemy's ``url``, every part percent-encoded (any password works)."""
    auth = quote(url.username or "", safe="")
    if url.password is not None:
        auth += ":" + quote(str(url.password), safe="")
    host = f"[{url.host}]" if url.host and ":" in url.host else (url.host or "")
    netloc = (f"{auth}@" if auth else "") + host + (f":{url.port}" if url.port else "")
    # The server converts text to UTF-8, the only encoding Arrow strings hold.
    params = {"connect_timeout": str(CONNECT_TIMEOUT_SECONDS), **url.query, "client_encoding": "UTF8"}
    database = quote(url.database or "", safe="")
    return f"postgresql://{netloc}/{database}?{urlencode(params, doseq=True, quote_via=quote)}"


def _cause(exc: BaseException, secrets: tuple[str, ...]) -> str:
    """The server's message of ``exc`` (or its first line), without credentials."""
    details = {(key.decode() if isinstance(key, bytes) else key): value
               for key, value in (getattr(exc, "details", None) or [])}
    primary = details.get("PG_DIAG_MESSAGE_PRIMARY")
    text = primary.decode("utf-8", "replace") if isinstance(primary, bytes) else str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return redact(text.split("ERROR:", 1)[-1].strip(), secrets)


def _secrets(engine: Engine) -> tuple[str, ...]:
    password = engine.url.password
    return (str(password), quote(str(password), safe="")) if password else ()


@contextmanager
def adbc_snapshot(engine: Engine) -> Iterator[Any]:
    """An ADBC cursor inside a read-only REPEATABLE READ transaction (rolled back at the end).

    The connection is in autocommit mode, so the transaction is exactly the statements sent:
    the driver adds no BEGIN or COMMIT of its own.
    """
    where, secrets = describe_engine(engine), _secrets(engine)
    try:
        connection = adbc.connect(libpq_uri(engine.url), autocommit=True)
    except _ADBC_ERRORS as exc:
        raise ReferenceDatabaseError(
            f"cannot read the reference database at {where}: {_cause(exc, secrets)}; check "
            f"HEIMDALL_DATABASE_URL and that the server is running"
        ) from None
    with connection, connection.cursor() as cursor:
        try:
            # As the engine's connections (make_engine): PostgreSQL 14+ cancels a query whose client died.
            cursor.execute("SELECT set_config('client_connection_check_interval', '2s', false) "
                           "WHERE current_setting('server_version_num')::int >= 140000")
            cursor.fetchall()
            cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        except _ADBC_ERRORS as exc:
            raise ReferenceDatabaseError(
                f"cannot read the reference database at {where}: {_cause(exc, secrets)}; check "
                f"HEIMDALL_DATABASE_URL and that the server is running"
            ) from None
        try:
            yield cursor
        finally:
            with suppress(*_ADBC_ERRORS):  # a broken connection has no transaction left to end
                cursor.execute("ROLLBACK")


def _source_error(engine: Engine, bucket: BucketPolicy, source: ReferenceSource, exc: BaseException,
                  seconds: float) -> ReferenceDatabaseError:
    """One line naming the bucket, the source, the server's message and what to do."""
    code = getattr(exc, "sqlstate", None) or ""
    if not code:  # ADBC's errors in mid-stream carry no SQLSTATE: the time taken, or the server's word, tells
        timed_out = seconds >= source.statement_timeout.total_seconds()
        code = _QUERY_CANCELED if timed_out else _SERVER_ERROR if "ERROR:" in str(exc) else ""
    return ReferenceDatabaseError(
        f"a reference query failed on {describe_engine(engine)}: bucket {bucket.name!r}, source {source.name!r}: "
        f"{_cause(exc, _secrets(engine))}; {source_fix(code)}"
    )


def _source_column(cursor: Any, bucket: BucketPolicy, source: ReferenceSource) -> Iterator[pa.Array]:
    """The first column of ``source.query``, batch by batch, under the source's statement_timeout."""
    milliseconds = int(source.statement_timeout.total_seconds() * 1000)
    cursor.execute(f"SET LOCAL statement_timeout = {milliseconds}")
    columns = cursor.adbc_execute_schema(source.query)
    first = columns.field(0).type
    if isinstance(first, pa.OpaqueType):  # a type ADBC has no Arrow type for (numeric, an enum, citext, ...)
        raise ReferenceDatabaseError(
            f"bucket {bucket.name!r}, source {source.name!r}: the first column's type ({first}) is not one the "
            f"reference read takes; select it as text in the query (e.g. {columns.field(0).name}::text)"
        )
    cursor.adbc_statement.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(BATCH_BYTES)})
    names = ", ".join(f"{_COLUMN}_{index}" for index in range(len(columns)))
    # Fresh names select the first column whatever the columns are called (even duplicates);
    # the newlines keep a trailing '--' comment from swallowing the parenthesis.
    cursor.execute(f"SELECT {_COLUMN}_0 FROM (\n{source.query}\n) AS heimdall_refs({names})")
    with cursor.fetch_record_batch() as batches:
        yield from (batch.column(0) for batch in batches)


def _read_ahead(items: Iterator[pa.Array], depth: int = AHEAD) -> Iterator[pa.Array]:
    """``items``, taken on a thread of their own up to ``depth`` ahead of the caller, so that the
    database keeps sending while the caller works (ADBC reads only when asked for a batch)."""
    ahead: queue.Queue[pa.Array | BaseException | None] = queue.Queue(maxsize=depth)  # None: the end
    stopping = threading.Event()

    def take() -> None:
        try:
            for item in items:
                ahead.put(item)
                if stopping.is_set():
                    break
            ahead.put(None)
        except BaseException as exc:  # handed to the caller
            ahead.put(exc)

    thread = threading.Thread(target=take, name="heimdall-references-read", daemon=True)
    thread.start()
    item = ahead.get()
    try:
        while isinstance(item, pa.Array):
            yield item
            item = ahead.get()
        if item is not None:
            raise item
    finally:
        stopping.set()
        while isinstance(item, pa.Array):  # the caller stopped early: unblock the reader until it ends
            item = ahead.get()
        thread.join()


def source_key_arrays(
    engine: Engine, cursor: Any, bucket: BucketPolicy, source: ReferenceSource, counts: ReferenceCounts
) -> Iterator[pa.Array]:
    """The keys ``source`` names, batch by batch; a database error becomes one ``ReferenceDatabaseError`` line.

    Read and normalised on a thread of its own, ahead of the caller, which counts and writes them.
    """
    began = time.monotonic()

    def values() -> Iterator[pa.Array]:
        try:
            yield from _source_column(cursor, bucket, source)
        except _ADBC_ERRORS as exc:
            raise _source_error(engine, bucket, source, exc, time.monotonic() - began) from None

    yield from _read_ahead(source_keys(bucket, source, batch, counts) for batch in values())


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
    failure: list[BaseException] = []

    def keys(cursor: Any, writer: BackgroundWriter) -> Iterator[pa.RecordBatch]:
        try:
            for source in bucket.references:
                for batch in source_key_arrays(engine, cursor, bucket, source, counts):
                    if len(batch):
                        writer.write_batch(_references_batch(batch, source.name))
                        yield pa.record_batch([batch], names=["key"])
        except BaseException as exc:  # DuckDB reports it as its own error: the original is raised instead
            failure.append(exc)
            raise

    with adbc_snapshot(engine) as cursor:
        began = time.perf_counter()  # the read, not the connection (as psycopg2's pool had it ready)
        # The snapshot is taken by the first query; the clock is read just before it, so
        # snapshot_at never claims a later moment than the snapshot really has.
        snapshot_at = clock()
        cursor.execute("SELECT 1")
        cursor.fetchall()
        uri = store.new_uri("references", bucket.name, snapshot_at, run_id)
        with (store.writer(uri, REFERENCES_SCHEMA, **REFERENCES_PARQUET) as parquet,
              in_background(parquet, depth=2) as writer,
              tempfile.TemporaryDirectory(prefix="heimdall-distinct-") as spill,
              duckdb.connect(config={**DISTINCT_CONFIG, "temp_directory": spill}) as database):
            # DuckDB pulls the batches through the normalisation and counts distinct keys as they
            # pass; its hash table spills beyond the memory limit.
            batches = keys(cursor, writer)
            database.register("streamed", pa.RecordBatchReader.from_batches(_KEYS, batches))
            try:
                referenced_count = database.execute("SELECT count(DISTINCT hash(key)) FROM streamed").fetchone()[0]
            except duckdb.Error:
                if failure:
                    raise failure[0] from None
                raise
            finally:
                batches.close()  # after a failure of DuckDB's own, stops the read (and its thread) here
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


def _references_batch(keys: pa.Array, source: str) -> pa.RecordBatch:
    sources = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(keys), dtype=np.int32)), pa.array([source]))
    return pa.record_batch([keys, sources], schema=REFERENCES_SCHEMA)
