"""Fresh checks just before a delete: is the key referenced now, and is the object unchanged?

The reference check re-runs each source query narrowed to the rows that *could* name one of
the batch's keys; Python then applies the scan's exact normalisation to those rows (SQL only
narrows, Python decides). By the rules of ``core/keys.py`` a value can normalise to key ``K``
of the bucket only when it is

- ``K``'s canonical spelling: ``s3://<bucket>/K`` (``uri``), ``<bucket>/K`` (``bucket_key``)
  or ``K`` (``key``), compared exactly (``= ANY``, which a btree index on the column serves); or
- an *unusual* spelling, one that normalisation changes: an ``S3://`` scheme, a leading ``/``,
  or a run of ``/`` in the key part. ``unusual_spelling_sql`` matches a superset of these for
  every bucket at once, with ``LIKE`` patterns that need no escaping; a partial index with
  the same predicate serves it.

Values are not trimmed, ``.``/``..`` segments and control characters make a value
unparseable (never a key), so nothing else can name ``K``. JSON containers apply the same
test to each member string. Sources the narrowing cannot cover exactly (percent-decoded
ones, columns of other types) are read whole instead: slower, never wrong.

Without indexes each check is one pass over the source's rows with cheap tests; with a btree
index on the column and a partial index ``WHERE <unusual_spelling_sql>`` it costs O(batch)
(docs/performance.md, "Deletion").
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from minio import Minio
from minio.error import S3Error
from sqlalchemy.engine import Connection

from heimdall_storage_pipeline.core.clock import ensure_utc, utc_datetimes
from heimdall_storage_pipeline.core.errors import source_error
from heimdall_storage_pipeline.core.keys import ReferenceFormat, canonical_prefix
from heimdall_storage_pipeline.core.list_objects_v2 import ListObjectsV2
from heimdall_storage_pipeline.core.policy import BucketPolicy, ReferenceSource
from heimdall_storage_pipeline.core.references import (
    FETCH_ROWS,
    ReferenceCounts,
    normalise_source_values,
)
from heimdall_storage_pipeline.core.safety import FreshStat

STAT_THREADS = 8
LISTING_MIN_KEYS = 8  # below this, HEAD requests are cheaper than a listing
LISTING_BUDGET_FACTOR = 4  # list at most this many objects per key asked for

# PostgreSQL type OIDs of a first column the narrowing understands. For these, ``value::text``
# is the string psycopg2 hands to the normalisation, except bpchar: its cast drops the padding
# that psycopg2 keeps, so the spellings are also compared without trailing spaces.
TEXT_OIDS = frozenset({25, 1043, 1042, 19})  # text, varchar, bpchar, name
BPCHAR_OID = 1042
JSON_OID = 114
JSONB_OID = 3802
_REF = "heimdall_ref"  # the first column's name inside the narrowed query


def canonical_spellings(bucket: str, fmt: ReferenceFormat, keys: Iterable[str], *, padded: bool = False) -> list[str]:
    """The exact spelling of each key; with ``padded``, also without trailing spaces (bpchar)."""
    prefix = canonical_prefix(bucket, fmt)
    spellings = {prefix + key for key in keys}
    if padded:
        spellings |= {spelling.rstrip(" ") for spelling in spellings}
    return sorted(spellings)


def unusual_spelling_sql(fmt: ReferenceFormat, expression: str) -> str:
    """SQL true for every string that normalises to a key without being its canonical spelling.

    It holds for any bucket, so its patterns need no escaping, and it is a superset:
    ``uri``: the scheme is ``s3://`` or ``S3://`` (``str.lower`` maps nothing else onto those
    five characters); the canonical one is followed by ``<bucket>/<raw key>`` whose ``/<raw
    key>`` holds a ``//`` exactly when the raw key has a leading ``/`` or a run of ``/``, so
    that ``//`` lies after ``s3://``. ``key``: a leading ``/`` or a ``//`` anywhere.
    ``bucket_key``: the same, since leading ``/`` come before the bucket and a bucket holds no
    ``/``. Cheapest test first: a prefix ``LIKE`` fails on the first character.
    """
    if fmt is ReferenceFormat.URI:
        return f"({expression} LIKE 'S3://%' OR {expression} LIKE 's3://%//%')"
    return f"({expression} LIKE '/%' OR {expression} LIKE '%//%')"


def _may_name(fmt: ReferenceFormat, expression: str) -> str:
    # The spellings travel as one newline-separated text, cheaper to bind than an array literal:
    # PostgreSQL folds string_to_array of a constant into a constant array (hashed ANY, index
    # scans). Keys hold no control characters, so no spelling holds a newline (``narrowed_query`` checks).
    return f"{expression} = ANY(string_to_array(:spellings, chr(10))) OR {unusual_spelling_sql(fmt, expression)}"


def narrowed_query(
    source: ReferenceSource, bucket: str, keys: Iterable[str], column_type: int | None, columns: int = 1
) -> tuple[str, dict[str, object]]:
    """The source query restricted to rows that may name one of ``keys``, or the whole query.

    ``column_type`` is the type OID of the query's first column and ``columns`` its column
    count (``describe_query``). One statement with the exact and unusual arms ORed, not a UNION
    ALL, which scans an unindexed table twice; with a btree index and the partial index on
    ``unusual_spelling_sql`` it is a BitmapOr of the two (docs/performance.md, "Deletion").
    """
    fmt = ReferenceFormat(source.format)
    if source.percent_decode or column_type is None:
        return source.query, {}
    names = ", ".join([_REF, *(f"{_REF}_{index}" for index in range(1, columns))])
    # Fresh names select the first column whatever the columns are called; the newlines keep
    # a trailing '--' comment of the query from swallowing the parenthesis.
    base = f"SELECT src.{_REF} FROM (\n{source.query}\n) AS src({names})"
    value = f"src.{_REF}"
    if source.container == "none" and column_type in TEXT_OIDS:
        where = _may_name(fmt, f"{value}::text")
        spellings = canonical_spellings(bucket, fmt, keys, padded=column_type == BPCHAR_OID)
    elif source.container == "json" and column_type == JSONB_OID:
        # Each member string, decoded by PostgreSQL exactly as psycopg2's json.loads decodes
        # it (jsonb holds no duplicate names and no \u0000): no escaping to care about. On 250k
        # Heimdall-shaped rows ~0.9 s, against 1.3-1.6 s for splitting jsonb's text at '"'
        # (printing jsonb as text dominates) and 8.3 s for the former regexp token split.
        # A top-level string names keys only through the JSON text it holds (double-encoded
        # JSON: the normalisation decodes a str again), whose strings need a '"': such rows
        # are always read.
        item = "m.item"
        where = (
            f"CASE jsonb_typeof({value})"
            f" WHEN 'object' THEN EXISTS (SELECT 1 FROM jsonb_each_text({value}) AS m(name, item)"
            f" WHERE {_may_name(fmt, item)})"
            f" WHEN 'array' THEN EXISTS (SELECT 1 FROM jsonb_array_elements_text({value}) AS m(item)"
            f" WHERE {_may_name(fmt, item)})"
            f" WHEN 'string' THEN strpos({value} #>> ARRAY[]::text[], '\"') > 0"
            f" ELSE false END"
        )
        spellings = canonical_spellings(bucket, fmt, keys)
    elif source.container == "json" and (column_type == JSON_OID or column_type in TEXT_OIDS):
        # JSON text as written: split at '"', a string without escapes is a whole piece. A
        # string with an escape (any character may be written as one) has a backslash in its
        # piece, and such rows are always read: Python decodes them.
        where = (
            f"EXISTS (SELECT 1 FROM string_to_table({value}::text, '\"') AS m(item)"
            f" WHERE {_may_name(fmt, 'm.item')} OR strpos(m.item, chr(92)) > 0)"
        )
        spellings = canonical_spellings(bucket, fmt, keys)
    else:
        return source.query, {}
    if any("\n" in spelling for spelling in spellings):  # not a key (control character); read whole
        return source.query, {}
    # A server-side cursor's query is planned for its first 10 % of rows (cursor_tuple_fraction),
    # which prefers a sequential scan to the index scans that answer it; a MATERIALIZED CTE is
    # planned for all of its rows.
    return (f"WITH narrowed AS MATERIALIZED (\n{base}\nWHERE {where}\n) SELECT {_REF} FROM narrowed",
            {"spellings": "\n".join(spellings)})


def describe_query(connection: Connection, query: str) -> tuple[int | None, int]:
    """The type OID of ``query``'s first column (None when the driver does not say) and its column count."""
    result = connection.execute(sa.text(f"SELECT * FROM (\n{query}\n) AS src LIMIT 0"))
    try:
        description = result.cursor.description if result.cursor is not None else None
    finally:
        result.close()
    if not description:
        return None, 1
    type_code = description[0][1]
    return (type_code if isinstance(type_code, int) else None), len(description)


def referenced_among(connection: Connection, bucket: BucketPolicy, keys: Iterable[str]) -> set[str]:
    """Those of the normalised ``keys`` that some reference source of ``bucket`` names now."""
    wanted = set(keys)
    if not wanted:
        return set()
    found: set[str] = set()
    ignored = ReferenceCounts()
    for source in bucket.references:
        try:
            # Local to the re-check's transaction: the source's own time limit, cancelled by the server.
            connection.execute(sa.text("SELECT set_config('statement_timeout', :ms, true)"),
                               {"ms": str(int(source.statement_timeout.total_seconds() * 1000))})
            column_type, columns = (None, 1) if source.percent_decode else describe_query(connection, source.query)
            sql, params = narrowed_query(source, bucket.name, wanted, column_type, columns)
            values = (row[0] for row in _stream_all(connection, sql, params))
            found.update(key for key in normalise_source_values(bucket, source, values, ignored) if key in wanted)
        except sa.exc.DBAPIError as exc:
            raise source_error(bucket.name, source.name, "re-checking the references of", exc,
                               connection.engine.url.render_as_string(hide_password=True)) from None
    return found


def _stream_all(connection: Connection, sql: str, params: dict[str, object]) -> Iterator[sa.Row[Any]]:
    """The rows of ``sql`` through a server-side cursor, so that a whole read keeps memory flat."""
    result = connection.execution_options(stream_results=True, max_row_buffer=FETCH_ROWS).execute(
        sa.text(sql), params
    )
    with result:
        yield from result


def _fresh(size: int | None, last_modified: datetime, etag: str | None, key: str) -> FreshStat:
    if last_modified.tzinfo is not UTC:  # the message is built only when it may be needed
        last_modified = ensure_utc(last_modified, f"last_modified of {key!r}")
    return FreshStat(size=size or 0, last_modified=last_modified, etag=(etag or "").strip('"'))


def _stat_one(client: Minio, bucket: str, key: str) -> FreshStat | None:
    try:
        stat = client.stat_object(bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
            return None
        raise
    return _fresh(stat.size, stat.last_modified, stat.etag, key)


def _just_before(key: str) -> str:
    """A string that sorts before ``key`` but after almost everything else that does (code point order,
    which is UTF-8's byte order); never a surrogate, which UTF-8 cannot carry to the server."""
    last = ord(key[-1])
    if last == 0:
        return key[:-1]
    previous = 0xD7FF if 0xD800 <= last - 1 <= 0xDFFF else last - 1
    return key[:-1] + chr(previous) + "\U0010ffff"


def _listed_stats(lister: ListObjectsV2, keys: list[str], budget: int) -> dict[str, FreshStat]:
    """Stats of those ``keys`` a bounded listing from the smallest of them finds."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    first = wanted[0].as_py()  # S3 lists in byte order (SeaweedFS nearly so): start just before the batch
    found: dict[str, FreshStat] = {}
    seen = 0
    # A string prefix, not a path: 'data/orphan-1' and 'data/orphan-2' share 'data/orphan-'.
    prefix = os.path.commonprefix(keys)  # noqa: RUF071
    for page in lister.batches(prefix=prefix, start_after=_just_before(first)):
        seen += page.num_rows
        # Only the batch's keys become Python objects: where most listed objects are referenced,
        # the listing holds several keys for each one asked for.
        page = page.filter(pc.is_in(page.column("key"), value_set=wanted))
        for key, size, modified, etag in zip(page.column("key").to_pylist(), page.column("size").to_pylist(),
                                             utc_datetimes(page.column("last_modified")),
                                             page.column("etag").to_pylist(), strict=True):
            found[key] = _fresh(size, modified, etag, key)
        if len(found) == len(wanted) or seen >= budget:
            break
    return found


def stat_objects(
    client: Minio, bucket: str, keys: list[str], lister: ListObjectsV2 | None = None, threads: int = STAT_THREADS
) -> dict[str, FreshStat | None]:
    """The current size, last-modified and ETag of each key; ``None`` for an object that is gone.

    A batch's keys come from one listing, so a bounded listing that starts just before the
    batch's first key usually answers for all of them in a few requests. Only HEAD decides
    that an object is gone: keys the listing does not settle (its order or budget) are asked
    for one by one, in parallel.
    """
    stats: dict[str, FreshStat | None] = {}
    if lister is not None and len(keys) >= LISTING_MIN_KEYS:
        stats.update(_listed_stats(lister, keys, LISTING_BUDGET_FACTOR * len(keys)))
    unsettled = [key for key in keys if key not in stats]
    if unsettled:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            stats.update(zip(unsettled, pool.map(lambda k: _stat_one(client, bucket, k), unsettled), strict=True))
    return stats


class Version(NamedTuple):
    version_id: str
    size: int
    last_modified: datetime
    etag: str
    is_latest: bool
    delete_marker: bool
    noncurrent_since: datetime | None  # when the next newer version replaced it; None for the latest


def _add_versions(found: dict[str, list[Version]], rows: pa.RecordBatch) -> None:
    """Append listed rows (a key's versions together, newest first) to each key's versions."""
    for row, modified in zip(rows.to_pylist(), utc_datetimes(rows.column("last_modified")), strict=True):
        versions = found.setdefault(row["key"], [])
        # Each version was replaced by the one listed before it.
        versions.append(Version(row["version_id"], row["size"], modified, row["etag"], row["is_latest"],
                                row["delete_marker"], None if row["is_latest"] else
                                versions[-1].last_modified if versions else modified))


def _versions_of(lister: ListObjectsV2, key: str) -> list[Version]:
    found: dict[str, list[Version]] = {}
    # With '/' as delimiter, keys under ``key/`` fold into one prefix: only ``key`` and its siblings are listed.
    for page in lister.version_pages(prefix=key, delimiter="/"):
        rows = page.versions.filter(pc.equal(page.versions.column("key"), key))
        _add_versions(found, rows)
        if rows.num_rows < page.versions.num_rows:  # listed past ``key``
            break
    return found.get(key, [])


def _listed_versions(lister: ListObjectsV2, keys: list[str], budget: int) -> dict[str, list[Version]]:
    """The versions of those ``keys`` a bounded version listing from the smallest of them lists whole."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    found: dict[str, list[Version]] = {}
    seen, last = 0, None
    prefix = os.path.commonprefix(keys)  # noqa: RUF071
    for page in lister.version_pages(prefix=prefix, key_marker=_just_before(wanted[0].as_py())):
        seen += page.versions.num_rows
        _add_versions(found, page.versions.filter(pc.is_in(page.versions.column("key"), value_set=wanted)))
        last = page.versions.column("key")[-1].as_py() if page.versions.num_rows else last
        if (last not in found and len(found) == len(wanted)) or seen >= budget:
            found.pop(last, None)  # its versions may go on in the next page
            break
    return found


def fresh_versions(lister: ListObjectsV2, keys: list[str], threads: int = STAT_THREADS) -> dict[str, list[Version]]:
    """Every version and delete marker of each key, newest first.

    As ``stat_objects``: one bounded listing from just before the batch's first key usually
    answers for the whole batch; the keys it leaves unsettled are listed one by one, in parallel.
    """
    found = _listed_versions(lister, keys, LISTING_BUDGET_FACTOR * len(keys)) if len(keys) >= LISTING_MIN_KEYS else {}
    unsettled = [key for key in keys if key not in found]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found.update(zip(unsettled, pool.map(lambda key: _versions_of(lister, key), unsettled), strict=True))
    return {key: found[key] for key in keys}
