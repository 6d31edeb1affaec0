"""Fresh checks just before a delete: is the key referenced now, and is the object unchanged?

The reference check re-runs each source query narrowed to rows that *could* name one of the
batch's keys: a row can only normalise to a key whose last path segment appears in it as a
token, so PostgreSQL filters on that segment (a hashed ``= ANY`` over a constant array, one
pass over the rows) and Python then applies the scan's exact normalisation. When the
narrowing could miss a spelling (percent-decoded sources; JSON values whose keys need
escaping), the source is read whole instead: slower, never wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import sqlalchemy as sa
from minio import Minio
from minio.error import S3Error
from sqlalchemy.engine import Connection

from heimdall_storage_pipeline.core.clock import ensure_utc
from heimdall_storage_pipeline.core.list_objects_v2 import ListObjectsV2, parse_page
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
_JSON_TOKEN_SEPARATORS = '"\\/ \t\n\r\f\v'  # what the JSON token split below cuts at, and escapes
# The last path segment of a plain value (values are not trimmed: keys may end in spaces).
_LAST_SEGMENT_SQL = "reverse(split_part(reverse(rtrim(src.value::text, '/')), '/', 1))"
# Tokens of a JSON text: path segments, split also at quotes and whitespace.
_JSON_TOKENS_SQL = "regexp_split_to_table(src.value::text, '[/\"[:space:]]+')"


def last_segment(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[-1]


def _json_safe(segment: str) -> bool:
    """Segments that appear verbatim in any JSON spelling of the key."""
    return segment.isascii() and segment.isprintable() and not any(c in segment for c in _JSON_TOKEN_SEPARATORS)


def narrowed_query(source: ReferenceSource, segments: set[str]) -> tuple[str, dict[str, object]]:
    """The source query restricted to rows that may name one of ``segments``."""
    base = f"SELECT src.value FROM ({source.query}) AS src(value)"
    if source.percent_decode:
        return source.query, {}
    if source.container == "json":
        if not all(_json_safe(s) for s in segments):
            return source.query, {}
        where = f"EXISTS (SELECT 1 FROM {_JSON_TOKENS_SQL} AS t(token) WHERE t.token = ANY(:segments))"
    else:
        where = f"{_LAST_SEGMENT_SQL} = ANY(:segments)"
    return f"{base} WHERE {where}", {"segments": sorted(segments)}


def referenced_among(connection: Connection, bucket: BucketPolicy, keys: Iterable[str]) -> set[str]:
    """Those of the normalised ``keys`` that some reference source of ``bucket`` names now."""
    wanted = set(keys)
    if not wanted:
        return set()
    segments = {last_segment(key) for key in wanted}
    found: set[str] = set()
    ignored = ReferenceCounts()
    for source in bucket.references:
        sql, params = narrowed_query(source, segments)
        result = connection.execution_options(stream_results=True, max_row_buffer=FETCH_ROWS).execute(
            sa.text(sql), params
        )
        values = (row[0] for row in result)
        found.update(key for key in normalise_source_values(bucket, source, values, ignored) if key in wanted)
    return found


def _fresh(size: int | None, last_modified: datetime, etag: str | None, key: str) -> FreshStat:
    return FreshStat(
        size=size or 0,
        last_modified=ensure_utc(last_modified, f"last_modified of {key!r}"),
        etag=(etag or "").strip('"'),
    )


def _stat_one(client: Minio, bucket: str, key: str) -> FreshStat | None:
    try:
        stat = client.stat_object(bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
            return None
        raise
    return _fresh(stat.size, stat.last_modified, stat.etag, key)


def _just_before(key: str) -> str:
    """A string that sorts before ``key`` but after almost everything else that does."""
    last = key[-1]
    return key[:-1] + chr(ord(last) - 1) + "\U0010ffff" if ord(last) > 0 else key[:-1]


def _listed_stats(lister: ListObjectsV2, keys: list[str], budget: int) -> dict[str, FreshStat]:
    """Stats of those ``keys`` a bounded listing from the smallest of them finds."""
    wanted = set(keys)
    first = min(keys)  # S3 lists in byte order (SeaweedFS nearly so): start just before the batch
    found: dict[str, FreshStat] = {}
    seen = 0
    # A string prefix, not a path: 'data/orphan-1' and 'data/orphan-2' share 'data/orphan-'.
    prefix = os.path.commonprefix(keys)  # noqa: RUF071
    for body in lister.pages(prefix=prefix, start_after=_just_before(first)):
        page = parse_page(body)[0].to_pydict()
        for key, size, modified, etag in zip(page["key"], page["size"], page["last_modified"], page["etag"],
                                             strict=True):
            if key in wanted:
                found[key] = _fresh(size, modified, etag, key)
        seen += len(page["key"])
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
