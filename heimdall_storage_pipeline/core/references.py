"""Reading reference sources: one read-only, repeatable-read snapshot, streamed by a server-side cursor."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from heimdall_storage_pipeline.core.clock import Clock, utc_now
from heimdall_storage_pipeline.core.errors import ReferenceDatabaseError, redact
from heimdall_storage_pipeline.core.keys import ParsedKind, expand_container, parse_reference
from heimdall_storage_pipeline.core.manifests import REFERENCES_SCHEMA, ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy, ReferenceSource

FETCH_ROWS = 10_000  # rows per server-side cursor fetch
SAMPLE_SIZE = 10
_SAMPLE_VALUE_CHARS = 200


def make_engine(url: str) -> Engine:
    """An engine for the reference database; ``postgresql://`` means psycopg2 here."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    try:
        return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except (sa.exc.ArgumentError, ValueError) as exc:
        raise ReferenceDatabaseError(
            redact(f"HEIMDALL_DATABASE_URL is not a valid SQLAlchemy URL ({exc}); use "
                   f"postgresql+psycopg2://user:password@host:5432/heimdall")
        ) from None


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
    with read_only_snapshot(engine) as connection:
        # The snapshot is taken by the first statement; the clock is read just before it,
        # so snapshot_at never claims a later moment than the snapshot really has.
        snapshot_at = clock()
        connection.execute(sa.text("SELECT 1"))
        uri = store.new_uri("references", bucket.name, snapshot_at, run_id)
        with store.writer(uri, REFERENCES_SCHEMA) as writer:
            for source in bucket.references:
                values = stream_source_values(connection, source)
                chunk: list[str] = []
                for key in normalise_source_values(bucket, source, values, counts):
                    chunk.append(key)
                    if len(chunk) >= FETCH_ROWS * 5:
                        writer.write_batch(_references_batch(chunk, source.name))
                        chunk = []
                writer.write_batch(_references_batch(chunk, source.name))
    keys = store.read_table(uri, columns=["key"]).column("key")
    return ReferencesResult(
        bucket=bucket.name,
        referenced_count=pc.count_distinct(keys).as_py(),
        reference_rows=counts.reference_rows,
        other_bucket_reference_count=counts.other_bucket,
        unparseable_reference_count=counts.unparseable,
        unparseable_sample=counts.unparseable_sample,
        snapshot_at=snapshot_at,
        manifest_uri=uri,
        read_seconds=time.perf_counter() - began,
    )


def _references_batch(keys: list[str], source: str) -> pa.RecordBatch:
    return pa.record_batch(
        [pa.array(keys, pa.string()), pa.array([source] * len(keys), pa.string())],
        schema=REFERENCES_SCHEMA,
    )
