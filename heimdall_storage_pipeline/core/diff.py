"""Orphan diff: inventory minus references minus companions, split by age at one ``as_of``.

DuckDB joins the two Parquet manifests out of core: past its memory budget it spills to a
temporary directory, so memory stays flat however large the bucket.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from tempfile import TemporaryDirectory
from typing import Any

import duckdb
import pyarrow as pa

from heimdall_storage_pipeline.core.clock import ensure_utc
from heimdall_storage_pipeline.core.errors import StaleInputError
from heimdall_storage_pipeline.core.health import health_status, share
from heimdall_storage_pipeline.core.keys import (
    CONTROL_PATTERN,
    DOT_SEGMENT_PATTERN,
    NEEDS_NORMALISATION_PATTERN,
    SLASH_RUNS_PATTERN,
)
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy, CompanionRule
from heimdall_storage_pipeline.core.safety import age_cutoff

SAMPLE_SIZE = 10
LARGEST_SHOWN = 10
# Orphan age histogram edges, in days; the last bin is open-ended.
AGE_BINS_DAYS = (1, 7, 30, 60, 90)
AGE_BIN_LABELS = (*(f"{low}-{high} d" for low, high in zip((0, *AGE_BINS_DAYS), AGE_BINS_DAYS, strict=False)),
                  f">= {AGE_BINS_DAYS[-1]} d")
# DuckDB's budgets, past which it spills; the process peaks well above them (docs/performance.md).
# DuckDB sometimes fails with an out-of-memory error instead of spilling: the diff then runs again
# with the next budget. A bucket of more than LARGE_BUCKET objects starts at the second: its
# out-of-core join keeps buffers for more partitions than the first budget holds.
MEMORY_LIMITS = ("48MB", "90MB", "180MB", "360MB")
LARGE_BUCKET = 2_000_000
# One thread: each of DuckDB's out-of-core join threads needs more memory than the budgets above.
THREADS = 1
_DAY_US = timedelta(days=1) // timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class OrphanDiffResult:
    bucket: str
    as_of: datetime
    object_count: int
    total_bytes: int
    referenced_count: int
    orphan_count: int
    orphan_bytes: int
    eligible_orphan_count: int
    eligible_orphan_bytes: int
    young_orphan_count: int
    young_orphan_bytes: int
    unparseable_object_count: int
    unparseable_object_sample: list[str]
    dangling_reference_count: int
    dangling_sample: list[str]
    age_histogram: list[dict[str, int | str]]
    largest_eligible: list[dict[str, int | str]]
    manifest_uri: str
    # A versioned bucket's other bytes on disk, from its inventory: noncurrent versions and delete markers.
    noncurrent_versions: int = 0
    noncurrent_bytes: int = 0
    delete_markers: int = 0

    @property
    def orphan_share_bytes(self) -> float:
        return share(self.orphan_bytes, self.total_bytes)

    @property
    def orphan_share_count(self) -> float:
        return share(self.orphan_count, self.object_count)

    @property
    def health_status(self) -> str:
        # Over all bytes on disk: noncurrent versions are waste as much as orphans.
        return health_status(share(self.orphan_bytes + self.noncurrent_bytes, self.total_bytes + self.noncurrent_bytes))


def check_snapshot_order(inventory_listed_at: datetime, references_snapshot_at: datetime) -> None:
    """References must be read after the listing finished (uploads precede their rows)."""
    if ensure_utc(references_snapshot_at) < ensure_utc(inventory_listed_at):
        raise StaleInputError(
            f"the reference snapshot ({references_snapshot_at.isoformat()}) is older than the "
            f"inventory listing it would be compared with ({inventory_listed_at.isoformat()}); "
            f"objects uploaded in between would look orphaned. Re-materialize referenced_keys "
            f"(or the whole storage_scan_job) for this bucket"
        )


def _sql_string(text: str) -> str:
    """``text`` as a SQL literal; DuckDB keeps backslashes, so RE2 patterns and ``\\1`` pass as they are."""
    return "'" + text.replace("'", "''") + "'"


def _connect(spill_directory: str, memory_limit: str) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(config={
        "memory_limit": memory_limit,
        "temp_directory": spill_directory,
        "preserve_insertion_order": False,  # every result whose order matters says ORDER BY
        "threads": THREADS,
        "autoinstall_known_extensions": False,  # nothing is downloaded while a diff runs
    })
    # keys.normalize_key in SQL (its patterns are RE2 too), NULL for a key it refuses.
    connection.execute(f"""
        CREATE MACRO collapsed(k) AS ltrim(regexp_replace(k, {_sql_string(SLASH_RUNS_PATTERN)}, '/', 'g'), '/');
        CREATE MACRO normalize_key(k) AS CASE
            WHEN regexp_matches(k, {_sql_string(CONTROL_PATTERN)}) OR collapsed(k) = ''
                 OR regexp_matches(collapsed(k), {_sql_string(DOT_SEGMENT_PATTERN)}) THEN NULL
            ELSE collapsed(k) END;
    """)
    return connection


def _create_views(connection: duckdb.DuckDBPyConnection, inventory: str, references: str,
                  rules: tuple[CompanionRule, ...], quarantine_prefix: str = "") -> None:
    """``listed`` (inventory rows with their normalised key, NULL when unparseable), ``referenced``
    (reference keys with their position) and ``companions`` (the keys the companion rules keep)."""
    companions = " UNION ALL ".join(
        [f"SELECT regexp_replace(key, {_sql_string(rule.match)}, {_sql_string(rule.companion)}, 'g') AS key"
         f" FROM referenced WHERE regexp_matches(key, {_sql_string(rule.match)})" for rule in rules]
        or ["SELECT NULL::VARCHAR AS key WHERE false"]
    )
    connection.execute(f"""
        CREATE VIEW listed AS
        SELECT file_row_number AS row, key, size, last_modified, etag,
               -- keys needing normalisation are rare: only they pay for it
               CASE WHEN regexp_matches(key, {_sql_string(NEEDS_NORMALISATION_PATTERN)})
                    THEN normalize_key(key) ELSE key END AS normalised
        FROM read_parquet({_sql_string(inventory)}, file_row_number = true)
        -- objects moved to the bucket's own quarantine prefix are no orphans
        WHERE {f"NOT starts_with(key, {_sql_string(quarantine_prefix)})" if quarantine_prefix else "true"};
        CREATE VIEW referenced AS
        SELECT file_row_number AS position, key
        FROM read_parquet({_sql_string(references)}, file_row_number = true) WHERE key IS NOT NULL;
        CREATE VIEW companions AS {companions};
    """)


def _row(connection: duckdb.DuckDBPyConnection, sql: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return _rows(connection, sql, parameters)[0]


def _rows(connection: duckdb.DuckDBPyConnection, sql: str, parameters: dict[str, Any] | None = None
          ) -> list[dict[str, Any]]:
    return connection.sql(sql, params=parameters).to_arrow_table().to_pylist()


def compute_orphan_diff(
    *,
    bucket: BucketPolicy,
    store: ManifestStore,
    inventory_uri: str,
    references_uri: str,
    as_of: datetime,
    run_id: str,
    work_dir: str | None = None,
    versions: dict[str, int] | None = None,
) -> OrphanDiffResult:
    """Write the orphan manifest for ``bucket`` and return its figures.

    An orphan is a listed object whose normalised key no reference or companion rule names.
    It is eligible for deletion when it is at least the bucket's minimum age at ``as_of``
    (age == minimum age counts as old enough) and its key could be normalised: a key we
    cannot parse is reported, never deleted. Orphans are written in inventory order.

    ``work_dir`` holds DuckDB's spill files and local copies of S3 manifests while the diff runs
    (default: the system temporary directory). ``versions`` carries a versioned bucket's
    ``noncurrent_versions``, ``noncurrent_bytes`` and ``delete_markers`` into the result.
    """
    # DuckDB allocates outside Arrow's pool: hand back what earlier steps freed in it first.
    pa.default_memory_pool().release_unused()
    attempt = partial(_compute_orphan_diff, bucket, store, inventory_uri, references_uri,
                      ensure_utc(as_of, "as_of"), run_id, work_dir)
    limits = MEMORY_LIMITS
    with store.open(inventory_uri) as inventory:
        if len(limits) > 1 and inventory.metadata.num_rows > LARGE_BUCKET:
            limits = limits[1:]
    *smaller, largest = limits
    for memory_limit in smaller:
        with suppress(duckdb.OutOfMemoryException):
            return replace(attempt(memory_limit), **(versions or {}))
    return replace(attempt(largest), **(versions or {}))


def _compute_orphan_diff(bucket: BucketPolicy, store: ManifestStore, inventory_uri: str, references_uri: str,
                         as_of: datetime, run_id: str, work_dir: str | None, memory_limit: str) -> OrphanDiffResult:
    with TemporaryDirectory(prefix="heimdall-diff-", dir=work_dir) as temporary:
        inventory = store.local_file(inventory_uri, temporary)
        references = store.local_file(references_uri, temporary)
        with _connect(temporary, memory_limit) as connection:
            quarantine = bucket.quarantine.root(bucket.name) if bucket.quarantine else None
            _create_views(connection, inventory, references, bucket.companions,
                          quarantine[1] if quarantine and quarantine[0] == bucket.name else "")
            connection.execute("""
                CREATE TABLE unique_references AS SELECT key, min(position) AS first FROM referenced GROUP BY key
            """)
            # One join finds both sides' unmatched rows: listed rows no reference names, dangling references.
            connection.execute("""
                CREATE TABLE unmatched AS
                SELECT listed.*, unique_references.key AS dangling, unique_references.first
                FROM listed FULL JOIN unique_references ON listed.normalised = unique_references.key
                WHERE unique_references.key IS NULL OR listed.row IS NULL
            """)
            dangling = _row(connection, f"""
                SELECT count(*) AS dangling_reference_count,
                       coalesce(min_by(dangling, first, {SAMPLE_SIZE}), []) AS dangling_sample
                FROM unmatched WHERE row IS NULL
            """)
            # Companions in a join of their own: one join building on references and companions
            # together overran the first budget.
            connection.execute("""
                CREATE TABLE orphans AS
                SELECT row, key, size, last_modified, etag, normalised IS NOT NULL AS parseable,
                       normalised IS NOT NULL AND last_modified <= $cutoff AS eligible
                FROM unmatched ANTI JOIN companions ON unmatched.normalised = companions.key
                WHERE row IS NOT NULL
            """, {"cutoff": age_cutoff(as_of, bucket.min_age)})
            totals = _row(connection, """
                SELECT count(*) AS object_count, coalesce(sum(size), 0)::BIGINT AS total_bytes,
                       (SELECT count(*) FROM unique_references) AS referenced_count
                FROM listed
            """)
            connection.execute("DROP TABLE unmatched; DROP TABLE unique_references")
            orphans = _row(connection, """
                SELECT count(*) AS orphan_count, coalesce(sum(size), 0)::BIGINT AS orphan_bytes,
                       count(*) FILTER (eligible) AS eligible_orphan_count,
                       coalesce(sum(size) FILTER (eligible), 0)::BIGINT AS eligible_orphan_bytes,
                       count(*) FILTER (parseable AND NOT eligible) AS young_orphan_count,
                       coalesce(sum(size) FILTER (parseable AND NOT eligible), 0)::BIGINT AS young_orphan_bytes,
                       count(*) FILTER (NOT parseable) AS unparseable_object_count
                FROM orphans
            """)
            unparseable_sample = _rows(connection, f"""
                SELECT key FROM orphans WHERE NOT parseable ORDER BY row LIMIT {SAMPLE_SIZE}
            """)
            ages = _rows(connection, """
                SELECT floor(($as_of_us - epoch_us(last_modified)) / $day_us) AS days,
                       count(*) AS count, sum(size)::BIGINT AS bytes
                FROM orphans GROUP BY days
            """, {"as_of_us": (as_of - _EPOCH) // timedelta(microseconds=1), "day_us": float(_DAY_US)})
            largest = _rows(connection, f"""
                SELECT key, size, last_modified FROM orphans WHERE eligible
                ORDER BY size DESC, row LIMIT {LARGEST_SHOWN}
            """)
            # DuckDB writes the manifest itself, so the sort and the Parquet encoding stay within its budget.
            written = f"{temporary}/orphans.parquet"
            connection.execute(f"""
                COPY (SELECT key, size, last_modified, etag, eligible FROM orphans ORDER BY row)
                TO {_sql_string(written)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 32768)
            """)
        uri = store.new_uri("orphans", bucket.name, as_of, run_id)
        store.put_file(written, uri)

    return OrphanDiffResult(
        bucket=bucket.name,
        as_of=as_of,
        **totals,
        **orphans,
        **dangling,
        unparseable_object_sample=[row["key"] for row in unparseable_sample],
        age_histogram=_age_histogram(ages),
        largest_eligible=[
            {"key": row["key"], "size": row["size"], "last_modified": row["last_modified"].astimezone(UTC).isoformat()}
            for row in largest
        ],
        manifest_uri=uri,
    )


def _age_histogram(ages: list[dict[str, Any]]) -> list[dict[str, int | str]]:
    """Orphan counts and bytes per age bin from those per whole day of age; future objects fall in none."""
    bins: list[dict[str, int | str]] = [{"age": label, "count": 0, "bytes": 0} for label in AGE_BIN_LABELS]
    for row in ages:
        if row["days"] is not None and row["days"] >= 0:
            slot = bins[bisect_right(AGE_BINS_DAYS, row["days"])]
            slot["count"] = int(slot["count"]) + row["count"]
            slot["bytes"] = int(slot["bytes"]) + row["bytes"]
    return bins


def dumps_sample(sample: list[str]) -> str:
    return json.dumps(sample, ensure_ascii=False)
