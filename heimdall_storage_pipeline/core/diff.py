"""Orphan diff: inventory minus references minus companions, split by age at one ``as_of``.

Memory does not grow with the bucket: the normalised listed keys and the protected keys
(references and companions) are hash-partitioned into K partitions, spilled to local temporary
disk, and anti-joined one partition at a time. What survives between passes is two bitmaps of
one bit per listed object, so the orphan manifest is written in inventory order by re-reading
the inventory. A bucket small enough for one partition never touches the disk. While it runs,
pyarrow allocates from jemalloc (see ``_diff_memory_pool``): with the default pool, memory freed
but not yet returned was most of the peak.

Passes: (1) inventory keys -> partitions, (2) reference and companion keys -> partitions,
(3) per partition: unique references, protected listed rows, dangling references,
(4) inventory again -> orphan manifest and figures.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from heimdall_storage_pipeline.core.clock import ensure_utc
from heimdall_storage_pipeline.core.errors import StaleInputError
from heimdall_storage_pipeline.core.health import health_status, share
from heimdall_storage_pipeline.core.keys import (
    NEEDS_NORMALISATION_PATTERN,
    InvalidKeyError,
    normalize_key,
)
from heimdall_storage_pipeline.core.manifests import ORPHANS_SCHEMA, ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy, CompanionRule
from heimdall_storage_pipeline.core.safety import age_cutoff

SAMPLE_SIZE = 10
LARGEST_SHOWN = 10
# Orphan age histogram edges, in days; the last bin is open-ended.
AGE_BINS_DAYS = (1, 7, 30, 60, 90)
# Keys (listed + referenced + companion) per partition: sets the per-partition working set
# (~100 bytes per key while a partition is joined). Smaller partitions were also faster: their
# hash tables stay in cache.
PARTITION_ROWS = 100_000
# Partitioned rows buffered in memory before they are appended to the spill files.
SPILL_BUFFER_BYTES = 8 * 1024**2
# Rows per batch read from a manifest. With WRITE_GROUP_ROWS, sets pass 4's peak: the batch
# being filtered and the orphans the Parquet writer is encoding are in memory together.
READ_BATCH_ROWS = 32_768
# Orphans are written in row groups of at least this many rows (not one per input batch).
WRITE_GROUP_ROWS = 65_536
_INVENTORY_COLUMNS = ["key", "size", "last_modified", "etag"]


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

    @property
    def orphan_share_bytes(self) -> float:
        return share(self.orphan_bytes, self.total_bytes)

    @property
    def orphan_share_count(self) -> float:
        return share(self.orphan_count, self.object_count)

    @property
    def health_status(self) -> str:
        return health_status(self.orphan_share_bytes)


def check_snapshot_order(inventory_listed_at: datetime, references_snapshot_at: datetime) -> None:
    """References must be read after the listing finished (uploads precede their rows)."""
    if ensure_utc(references_snapshot_at) < ensure_utc(inventory_listed_at):
        raise StaleInputError(
            f"the reference snapshot ({references_snapshot_at.isoformat()}) is older than the "
            f"inventory listing it would be compared with ({inventory_listed_at.isoformat()}); "
            f"objects uploaded in between would look orphaned. Re-materialize referenced_keys "
            f"(or the whole storage_scan_job) for this bucket"
        )


def normalise_listed_keys(keys: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Normalised keys (null where unparseable) and a parseable mask.

    Only keys that need it take the per-key Python path; listings almost never have any.
    """
    needs_work = pc.match_substring_regex(keys, NEEDS_NORMALISATION_PATTERN)
    if not pc.any(needs_work).as_py():
        return keys, pc.is_valid(keys)
    normalised: list[str | None] = keys.to_pylist()
    for index in pc.indices_nonzero(needs_work).to_pylist():
        try:
            normalised[index] = normalize_key(normalised[index])
        except InvalidKeyError:
            normalised[index] = None
    array = pa.array(normalised, pa.string())
    return array, pc.is_valid(array)


def companion_keys(referenced: pa.Array, rules: tuple[CompanionRule, ...]) -> pa.Array:
    """Keys kept because a referenced key derives them (e.g. ``x.npy`` keeps ``x_metadata.json``)."""
    parts = [pa.array([], pa.string())]
    for rule in rules:
        matching = referenced.filter(pc.match_substring_regex(referenced, rule.match))
        parts.append(pc.replace_substring_regex(matching, rule.match, rule.companion))
    return pa.concat_arrays(parts)


# --- partitioning -------------------------------------------------------------------------

_duckdb = threading.local()  # a DuckDB connection is not shared between threads


def _hash_strings(keys: pa.Array) -> np.ndarray:
    """A 32-bit hash of each string, for partitioning (DuckDB's ``hash``): equal strings hash equally."""
    if not hasattr(_duckdb, "connection"):
        _duckdb.connection = duckdb.connect()
    strings = pa.table({"key": keys})  # noqa: F841  (read by the query below)
    hashes = _duckdb.connection.sql("SELECT hash(key) % 4294967296 AS h FROM strings").fetchnumpy()["h"]
    return hashes.astype(np.uint32)


class _Partitions:
    """K partitions of record batches: buffered in memory and, once the buffer grows past
    ``SPILL_BUFFER_BYTES``, appended to one local spill file per set (listed, referenced,
    companions), each partition's rows of that flush as one Arrow IPC message whose (offset,
    length) an in-memory index keeps. A flush is K appends to one open file, and a partition is
    read back with one positioned read per flush. With one partition nothing is spilled, since that
    partition is loaded whole for its join anyway."""

    def __init__(self, name: str, schema: pa.Schema, count: int, work_dir: _WorkDir) -> None:
        self.name, self.schema, self.count, self.work_dir = name, schema, count, work_dir
        self.pending: list[list[pa.RecordBatch]] = [[] for _ in range(count)]
        self.pending_bytes = 0
        self.spilled: list[list[tuple[int, int]]] = [[] for _ in range(count)]
        self.path: Path | None = None
        self.file: pa.NativeFile | None = None
        self.size = 0
        self.unread = count

    def add(self, batch: pa.RecordBatch, hash_column: str) -> None:
        if batch.num_rows == 0:
            return
        if self.count == 1:
            self.pending[0].append(batch)
            return
        part = _hash_strings(batch.column(hash_column)) % np.uint32(self.count)
        order = np.argsort(part, kind="stable")
        ordered = batch.take(pa.array(order))
        bounds = np.searchsorted(part[order], np.arange(self.count + 1))
        for index in range(self.count):
            if bounds[index + 1] > bounds[index]:
                self.pending[index].append(ordered.slice(bounds[index], bounds[index + 1] - bounds[index]))
        self.pending_bytes += ordered.nbytes
        if self.pending_bytes > SPILL_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        for index, batches in enumerate(self.pending):
            if not batches:
                continue
            if self.file is None:
                self.path = self.work_dir.path(f"{self.name}.arrows")
                self.file = pa.OSFile(str(self.path), "wb")
                self.work_dir.stack.callback(self.close)  # runs before the directory is removed
            # One message per partition and flush (a lone slice is serialised truncated to its rows).
            message = (batches[0] if len(batches) == 1 else pa.concat_batches(batches)).serialize()
            self.file.write(message)
            self.spilled[index].append((self.size, message.size))
            self.size += message.size
            batches.clear()
        self.pending_bytes = 0

    def finish(self) -> None:
        """Done adding: spill what is buffered, so that only one partition is in memory at a time."""
        if self.count > 1:
            self.flush()
        if self.file is not None:
            self.file.close()
            self.file = None

    def read(self, index: int) -> pa.Table:
        """The whole partition ``index``, in the order its rows were added, in one or more chunks.

        The spill file is removed once every partition has been read."""
        batches: list[pa.RecordBatch] = []
        if self.spilled[index]:
            assert self.path is not None
            with pa.OSFile(str(self.path), "rb") as source:
                for offset, length in self.spilled[index]:
                    batches.append(pa.ipc.read_record_batch(source.read_at(length, offset), self.schema))
        batches += self.pending[index]
        self.spilled[index], self.pending[index] = [], []
        self.unread -= 1
        if self.unread == 0:
            self.close()
        return pa.Table.from_batches(batches, self.schema)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class _WorkDir:
    """A temporary directory created only when something is spilled."""

    def __init__(self, parent: str | None, stack: ExitStack) -> None:
        self.parent, self.stack, self.root = parent, stack, None

    def path(self, name: str) -> Path:
        if self.root is None:
            temporary = TemporaryDirectory(prefix="heimdall-diff-", dir=self.parent)
            self.root = Path(self.stack.enter_context(temporary))
        return self.root / name


def _batches(parquet: pq.ParquetFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's rows in order, one row group at a time, decoded on the calling thread.

    A reader over the whole file holds on to a few bytes per row already read (~65 MB over
    10M rows with pyarrow 26); a reader per row group does not. Decoding on Arrow's thread pool
    was no faster for these few columns, and each pool thread kept freed memory of its own
    (~45 MB more peak RSS at 1M keys).
    """
    for group in range(parquet.metadata.num_row_groups):
        yield from parquet.iter_batches(
            batch_size=READ_BATCH_ROWS, columns=columns, row_groups=[group], use_threads=False
        )


# --- the Arrow memory pool the diff allocates from -----------------------------------------

_pool_lock = threading.Lock()
_pool_users = 0
_pool_outside: pa.MemoryPool | None = None


@contextmanager
def _diff_memory_pool() -> Iterator[None]:
    """Make pyarrow's default pool jemalloc while a diff runs, unless ``ARROW_DEFAULT_MEMORY_POOL`` chose one.

    The diff allocates and frees a few MB per batch, many batches a second. pyarrow's default,
    mimalloc (3.4 in pyarrow 26), keeps freed pages for a second before it returns them
    (``purge_delay``), and that retention, not live data, was most of the diff's peak RSS;
    jemalloc returned them sooner. The pool outside is
    told to return what it no longer uses before the switch (the earlier scan stages' leftovers)
    and after it (what Arrow's own C++ code, e.g. the Parquet writer, took from it meanwhile), and
    jemalloc afterwards. Process-wide state, hence the count of diffs running at once: the first
    switches, the last restores. Buffers remember their pool, so switching is safe at any time.
    """
    global _pool_users, _pool_outside
    try:
        pool = None if os.environ.get("ARROW_DEFAULT_MEMORY_POOL") else pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        pool = None
    if pool is None:
        yield
        return
    with _pool_lock:
        if _pool_users == 0:
            _pool_outside = pa.default_memory_pool()
            _pool_outside.release_unused()
            pa.set_memory_pool(pool)
        _pool_users += 1
    try:
        yield
    finally:
        with _pool_lock:
            _pool_users -= 1
            if _pool_users == 0 and _pool_outside is not None:
                pa.set_memory_pool(_pool_outside)
                _pool_outside.release_unused()
                _pool_outside = None
                pool.release_unused()


# --- bitmaps over inventory rows ------------------------------------------------------------


def _set_bits(bits: np.ndarray, rows: np.ndarray) -> None:
    rows = rows.astype(np.int64, copy=False)
    np.bitwise_or.at(bits, rows >> 3, np.left_shift(1, rows & 7).astype(np.uint8))


def _get_bits(bits: np.ndarray, start: int, count: int) -> np.ndarray:
    first = start >> 3
    chunk = np.unpackbits(bits[first : ((start + count + 7) >> 3) + 1], bitorder="little")
    shift = start - (first << 3)
    return chunk[shift : shift + count].astype(bool)


# --- the diff ------------------------------------------------------------------------------


def _age_bins() -> list[tuple[int, int | None, str]]:
    return [
        (low, high, f"{low}-{high} d" if high is not None else f">= {low} d")
        for low, high in zip((0, *AGE_BINS_DAYS), (*AGE_BINS_DAYS, None), strict=True)
    ]


def _count_and_bytes(sizes: pa.Array, mask: pa.Array) -> tuple[int, int]:
    selected = sizes.filter(mask)
    return len(selected), pc.sum(selected).as_py() or 0


@dataclass
class _Totals:
    """Figures accumulated over the streamed orphan batches."""

    orphan_count: int = 0
    orphan_bytes: int = 0
    eligible_count: int = 0
    eligible_bytes: int = 0
    young_count: int = 0
    young_bytes: int = 0


def compute_orphan_diff(
    *,
    bucket: BucketPolicy,
    store: ManifestStore,
    inventory_uri: str,
    references_uri: str,
    as_of: datetime,
    run_id: str,
    work_dir: str | None = None,
    partition_rows: int = PARTITION_ROWS,
) -> OrphanDiffResult:
    """Write the orphan manifest for ``bucket`` and return its figures.

    An orphan is a listed object whose normalised key no reference or companion rule names.
    It is eligible for deletion when it is at least the bucket's minimum age at ``as_of``
    (age == minimum age counts as old enough) and its key could be normalised: a key we
    cannot parse is reported, never deleted. Orphans are written in inventory order.

    ``work_dir`` is where partitions spill (default: the system temporary directory);
    ``partition_rows`` sizes the partitions (tests lower it to force many).
    """
    with _diff_memory_pool():
        return _compute_orphan_diff(bucket=bucket, store=store, inventory_uri=inventory_uri,
                                    references_uri=references_uri, as_of=as_of, run_id=run_id,
                                    work_dir=work_dir, partition_rows=partition_rows)


def _compute_orphan_diff(
    *,
    bucket: BucketPolicy,
    store: ManifestStore,
    inventory_uri: str,
    references_uri: str,
    as_of: datetime,
    run_id: str,
    work_dir: str | None,
    partition_rows: int,
) -> OrphanDiffResult:
    as_of = ensure_utc(as_of, "as_of")
    inventory_file = store.open(inventory_uri)
    references_file = store.open(references_uri)
    object_rows = inventory_file.metadata.num_rows
    reference_rows = references_file.metadata.num_rows
    # Upper bound of the keys to partition: every reference may derive one companion per rule.
    keys_to_join = object_rows + reference_rows * (1 + len(bucket.companions))
    partition_count = max(1, math.ceil(keys_to_join / max(1, partition_rows)))
    timestamp_type = inventory_file.schema_arrow.field("last_modified").type

    with ExitStack() as stack:
        work = _WorkDir(work_dir, stack)
        listed = _Partitions("listed", pa.schema([("key", pa.string()), ("row", pa.int64())]), partition_count, work)
        referenced = _Partitions("referenced", listed.schema, partition_count, work)
        companions = _Partitions("companions", pa.schema([("key", pa.string())]), partition_count, work)
        # One bit per listed row: its normalised key is protected / it cannot be normalised.
        protected_bits = np.zeros((object_rows >> 3) + 2, dtype=np.uint8)
        unparseable_bits = np.zeros_like(protected_bits)

        # Pass 1: normalise the listed keys; partition the parseable ones with their row numbers.
        object_count = total_bytes = unparseable_count = 0
        unparseable_sample: list[str] = []
        for batch in _batches(inventory_file, ["key", "size"]):
            keys = batch.column("key")
            normalised, parseable = normalise_listed_keys(keys)
            rows = pa.array(np.arange(object_count, object_count + len(keys), dtype=np.int64))
            if not pc.all(parseable).as_py():
                bad = pc.invert(parseable)
                bad_rows = rows.filter(bad).to_numpy()
                _set_bits(unparseable_bits, bad_rows)
                unparseable_count += len(bad_rows)
                if len(unparseable_sample) < SAMPLE_SIZE:
                    unparseable_sample += keys.filter(bad).slice(0, SAMPLE_SIZE - len(unparseable_sample)).to_pylist()
                normalised, rows = normalised.filter(parseable), rows.filter(parseable)
            listed.add(pa.record_batch([normalised.cast(pa.string()), rows], schema=listed.schema), "key")
            object_count += len(keys)
            total_bytes += pc.sum(batch.column("size")).as_py() or 0
        if object_count != object_rows:
            raise ValueError(f"inventory {inventory_uri} holds {object_count} rows, its footer says {object_rows}")
        listed.finish()

        # Pass 2: partition reference keys (with their position, for the dangling sample's order)
        # and the companion keys they derive; a companion usually lands in another partition.
        position = 0
        for batch in _batches(references_file, ["key"]):
            keys = batch.column("key").cast(pa.string())
            rows = pa.array(np.arange(position, position + len(keys), dtype=np.int64))
            position += len(keys)
            if keys.null_count:
                rows, keys = rows.filter(keys.is_valid()), keys.drop_null()
            referenced.add(pa.record_batch([keys, rows], schema=referenced.schema), "key")
            derived = companion_keys(keys, bucket.companions)
            companions.add(pa.record_batch([derived], schema=companions.schema), "key")
        referenced.finish()
        companions.finish()

        # Pass 3: join partition by partition. Partitions stay in the chunks they were spilled in
        # (the kernels take chunked arrays) instead of being copied into one piece first.
        referenced_count = dangling_count = 0
        dangling_candidates: list[tuple[int, str]] = []
        for index in range(partition_count):
            listed_keys = listed.read(index)
            references = referenced.read(index)
            # Rows of a partition keep manifest order, so unique() lists keys by first occurrence.
            unique_references = pc.unique(references.column("key"))
            referenced_count += len(unique_references)
            protected = pa.concat_arrays([unique_references, *companions.read(index).column("key").chunks])
            is_protected = pc.is_in(listed_keys.column("key"), value_set=protected)
            _set_bits(protected_bits, listed_keys.column("row").filter(is_protected).to_numpy())
            del protected, is_protected
            dangling = unique_references.filter(
                pc.invert(pc.is_in(unique_references, value_set=listed_keys.column("key")))
            )
            dangling_count += len(dangling)
            if len(dangling):
                # This partition's first dangling keys, placed among the others by first position.
                sample = dangling.slice(0, SAMPLE_SIZE)
                positions = references.column("row").take(pc.index_in(sample, value_set=references.column("key")))
                dangling_candidates = sorted(
                    dangling_candidates + list(zip(positions.to_pylist(), sample.to_pylist(), strict=True))
                )
                del dangling_candidates[SAMPLE_SIZE:]
            del listed_keys, references, unique_references, dangling

        # Pass 4: the inventory again, in order: write the orphans and their figures.
        cutoff = pa.scalar(age_cutoff(as_of, bucket.min_age), type=timestamp_type)
        as_of_scalar = pa.scalar(as_of, type=timestamp_type)
        day_us = timedelta(days=1) / timedelta(microseconds=1)
        bins = _age_bins()
        histogram = [[0, 0] for _ in bins]
        totals = _Totals()
        largest: pa.Table | None = None
        uri = store.new_uri("orphans", bucket.name, as_of, run_id)
        with store.writer(uri, ORPHANS_SCHEMA) as writer:
            buffered: list[pa.RecordBatch] = []
            buffered_rows = start = 0
            for batch in _batches(inventory_file, _INVENTORY_COLUMNS):
                count = batch.num_rows
                orphan_mask = pa.array(~_get_bits(protected_bits, start, count))
                parseable = pa.array(~_get_bits(unparseable_bits, start, count))
                start += count
                orphans = batch.filter(orphan_mask)
                if orphans.num_rows == 0:
                    continue
                orphan_parseable = parseable.filter(orphan_mask)
                last_modified = orphans.column("last_modified")
                old_enough = pc.less_equal(last_modified, cutoff)
                eligible = pc.and_(old_enough, orphan_parseable)
                young = pc.and_(pc.invert(old_enough), orphan_parseable)
                sizes = orphans.column("size")
                totals.orphan_count += orphans.num_rows
                totals.orphan_bytes += pc.sum(sizes).as_py() or 0
                count_, bytes_ = _count_and_bytes(sizes, eligible)
                totals.eligible_count += count_
                totals.eligible_bytes += bytes_
                count_, bytes_ = _count_and_bytes(sizes, young)
                totals.young_count += count_
                totals.young_bytes += bytes_
                age_us = pc.subtract(as_of_scalar, last_modified).cast(pa.int64())
                ages_days = pc.floor(pc.divide(age_us.cast(pa.float64()), day_us))
                for slot, (low, high, _) in zip(histogram, bins, strict=True):
                    in_bin = pc.greater_equal(ages_days, low)
                    if high is not None:
                        in_bin = pc.and_(in_bin, pc.less(ages_days, high))
                    count_, bytes_ = _count_and_bytes(sizes, in_bin)
                    slot[0] += count_
                    slot[1] += bytes_
                candidates = pa.Table.from_batches([orphans.filter(eligible).select(["key", "size", "last_modified"])])
                if largest is not None:
                    candidates = pa.concat_tables([largest, candidates])
                largest = candidates.take(
                    pc.select_k_unstable(candidates, min(LARGEST_SHOWN, candidates.num_rows), [("size", "descending")])
                )
                buffered.append(
                    pa.RecordBatch.from_arrays([*orphans.columns, eligible], names=ORPHANS_SCHEMA.names).cast(
                        ORPHANS_SCHEMA
                    )
                )
                buffered_rows += orphans.num_rows
                if buffered_rows >= WRITE_GROUP_ROWS:
                    writer.write_table(pa.Table.from_batches(buffered, ORPHANS_SCHEMA))
                    buffered, buffered_rows = [], 0
            if buffered:
                writer.write_table(pa.Table.from_batches(buffered, ORPHANS_SCHEMA))

    largest_rows = [] if largest is None else largest.sort_by([("size", "descending")]).to_pylist()
    return OrphanDiffResult(
        bucket=bucket.name,
        as_of=as_of,
        object_count=object_count,
        total_bytes=total_bytes,
        referenced_count=referenced_count,
        orphan_count=totals.orphan_count,
        orphan_bytes=totals.orphan_bytes,
        eligible_orphan_count=totals.eligible_count,
        eligible_orphan_bytes=totals.eligible_bytes,
        young_orphan_count=totals.young_count,
        young_orphan_bytes=totals.young_bytes,
        unparseable_object_count=unparseable_count,
        unparseable_object_sample=unparseable_sample,
        dangling_reference_count=dangling_count,
        dangling_sample=[key for _, key in dangling_candidates],
        age_histogram=[
            {"age": label, "count": count, "bytes": size}
            for (count, size), (_, _, label) in zip(histogram, bins, strict=True)
        ],
        largest_eligible=[
            {"key": row["key"], "size": row["size"], "last_modified": row["last_modified"].isoformat()}
            for row in largest_rows
        ],
        manifest_uri=uri,
    )


def render_largest_table(rows: list[dict[str, int | str]]) -> str:
    if not rows:
        return "_No eligible orphans._"
    lines = ["| key | size (bytes) | last modified (UTC) |", "| --- | ---: | --- |"]
    lines += [f"| `{r['key']}` | {r['size']} | {r['last_modified']} |" for r in rows]
    return "\n".join(lines)


def render_age_histogram(rows: list[dict[str, int | str]]) -> str:
    lines = ["| orphan age | objects | bytes |", "| --- | ---: | ---: |"]
    lines += [f"| {r['age']} | {r['count']} | {r['bytes']} |" for r in rows]
    return "\n".join(lines)


def dumps_sample(sample: list[str]) -> str:
    return json.dumps(sample, ensure_ascii=False)
