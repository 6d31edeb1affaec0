"""Parquet manifests: the bulk data passed between stages, by URI, never overwritten.

A manifest store is a local directory or an ``s3://bucket/prefix`` location, so that steps
can run on different machines. Files are written under a temporary name and only appear
under their final name once complete: a failed step leaves no manifest behind.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from heimdall_storage_pipeline.core.clock import ensure_utc
from heimdall_storage_pipeline.core.errors import ManifestError, redact
from heimdall_storage_pipeline.core.s3 import S3Settings

TIMESTAMP = pa.timestamp("us", tz="UTC")
INVENTORY_SCHEMA = pa.schema(
    [("key", pa.string()), ("size", pa.int64()), ("last_modified", TIMESTAMP), ("etag", pa.string())]
)
# source is dictionary-encoded: one name repeated per key would cost as much to write as the keys.
REFERENCES_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.dictionary(pa.int32(), pa.string()))])
ORPHANS_SCHEMA = INVENTORY_SCHEMA.append(pa.field("eligible", pa.bool_()))
# outcome: deleted, would_delete, skipped_referenced, skipped_missing, skipped_changed,
# skipped_young or failed (core.safety.Outcome)
DELETIONS_SCHEMA = INVENTORY_SCHEMA.append(pa.field("outcome", pa.string()))
# Every version and delete marker of a versioned bucket, in the server's order (a key's newest first).
VERSIONS_SCHEMA = pa.schema([("key", pa.string()), ("version_id", pa.string()), ("size", pa.int64()),
                             ("last_modified", TIMESTAMP), ("etag", pa.string()), ("is_latest", pa.bool_()),
                             ("delete_marker", pa.bool_())])
MANIFEST_KINDS = ("inventory", "references", "orphans", "deletions", "versions")
_STAMP = "%Y%m%dT%H%M%S%fZ"


@dataclass(frozen=True)
class ManifestStore:
    """Where manifests live: ``/abs/dir``, ``file:///abs/dir`` or ``s3://bucket/prefix``."""

    root: str
    s3: S3Settings | None = None

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        if self.is_s3:
            if self.s3 is None:
                raise ManifestError(
                    f"manifest store {self.root} is on S3 but no S3 settings were given; "
                    f"configure the S3 resource (MINIO_ENDPOINT, ...)"
                )
            filesystem = pafs.S3FileSystem(
                access_key=self.s3.access_key,
                secret_key=self.s3.secret_key,
                endpoint_override=self.s3.endpoint,
                scheme="https" if self.s3.secure else "http",
                region=self.s3.region or "us-east-1",
                connect_timeout=10, request_timeout=120,  # every request to the store has a time limit
            )
            return filesystem, self.root.removeprefix("s3://").rstrip("/")
        base = self.root.removeprefix("file://")
        if not Path(base).is_absolute():
            raise ManifestError(f"manifest store {self.root!r} must be an absolute path or s3:// URI")
        return pafs.LocalFileSystem(), base.rstrip("/")

    def _to_uri(self, path: str) -> str:
        return f"s3://{path}" if self.is_s3 else path

    def _to_path(self, uri: str) -> str:
        return uri.removeprefix("s3://") if self.is_s3 else uri.removeprefix("file://")

    def new_uri(self, kind: str, bucket: str, at: datetime, run_id: str) -> str:
        """A fresh, never-reused URI: kind/bucket/<UTC time>-<run>-<random>.parquet."""
        if kind not in MANIFEST_KINDS:
            raise ValueError(f"unknown manifest kind {kind!r}")
        _, base = self._filesystem()
        stamp = ensure_utc(at).strftime(_STAMP)
        name = f"{stamp}-{run_id[:8]}-{uuid.uuid4().hex[:8]}.parquet"
        return self._to_uri(f"{base}/{kind}/{bucket}/{name}")

    @contextmanager
    def _all_or_nothing(self, uri: str) -> Iterator[tuple[pafs.FileSystem, str]]:
        """A filesystem and path to write ``uri`` at; the file appears at ``uri`` only if the block completes."""
        filesystem, _ = self._filesystem()
        final = self._to_path(uri)
        if not self.is_s3:
            Path(final).parent.mkdir(parents=True, exist_ok=True)
        # On S3 an object only appears when its upload completes, so the final name is safe
        # there; locally a rename gives the same all-or-nothing behaviour.
        temporary = final if self.is_s3 else f"{final}.partial-{uuid.uuid4().hex[:8]}"
        try:
            yield filesystem, temporary
        except BaseException:
            with suppress(OSError):
                filesystem.delete_file(temporary)
            raise
        if temporary != final:
            filesystem.move(temporary, final)

    @contextmanager
    def writer(self, uri: str, schema: pa.Schema, **parquet_options: Any) -> Iterator[pq.ParquetWriter]:
        """Write a manifest; it appears at ``uri`` only if the block completes.

        ``parquet_options`` override the defaults (zstd, dictionaries) for ``pq.ParquetWriter``.
        """
        with (
            self._all_or_nothing(uri) as (filesystem, temporary),
            filesystem.open_output_stream(temporary) as stream,
            pq.ParquetWriter(stream, schema, **{"compression": "zstd", **parquet_options}) as parquet_writer,
        ):
            yield parquet_writer

    def put_file(self, local_path: str, uri: str) -> None:
        """Store a finished local Parquet file as the manifest ``uri``; like ``writer``, all or nothing."""
        with self._all_or_nothing(uri) as (filesystem, temporary):
            pafs.copy_files(local_path, temporary, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=filesystem)

    def write_table(self, uri: str, table: pa.Table) -> None:
        with self.writer(uri, table.schema) as parquet_writer:
            parquet_writer.write_table(table)

    def _unreadable(self, uri: str, exc: Exception) -> ManifestError:
        secrets = (self.s3.secret_key, self.s3.access_key) if self.s3 else ()
        return ManifestError(
            redact(f"cannot read manifest {uri}: {exc}; it may have been pruned or the manifest "
                   f"store moved: re-materialize the asset that wrote it", secrets)
        )

    def open(self, uri: str) -> pq.ParquetFile:
        filesystem, _ = self._filesystem()
        try:
            return pq.ParquetFile(filesystem.open_input_file(self._to_path(uri)))
        except (OSError, pa.ArrowInvalid) as exc:
            raise self._unreadable(uri, exc) from None

    def local_file(self, uri: str, directory: str) -> str:
        """A local path of the manifest at ``uri``: the file itself, or a copy made in ``directory`` (S3)."""
        filesystem, _ = self._filesystem()
        path = self._to_path(uri)
        try:
            if not self.is_s3:
                if filesystem.get_file_info(path).type != pafs.FileType.File:
                    raise FileNotFoundError(f"no such file: {path}")
                return path
            copy = str(Path(directory) / Path(path).name)
            pafs.copy_files(path, copy, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
            return copy
        except OSError as exc:
            raise self._unreadable(uri, exc) from None

    def digest(self, uri: str) -> str:
        """SHA-256 of the manifest file's bytes: what a plan's approval refers to."""
        filesystem, _ = self._filesystem()
        sha = hashlib.sha256()
        try:
            with filesystem.open_input_stream(self._to_path(uri)) as stream:
                while chunk := stream.read(1 << 20):
                    sha.update(chunk)
        except OSError as exc:
            secrets = (self.s3.secret_key, self.s3.access_key) if self.s3 else ()
            raise ManifestError(
                redact(f"cannot read manifest {uri}: {exc}; it may have been pruned", secrets)
            ) from None
        return sha.hexdigest()

    def read_table(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        return self.open(uri).read(columns=columns)

    def iter_batches(
        self, uri: str, columns: list[str] | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Stream a manifest; one row group at a time, because pyarrow's whole-file batch reader
        keeps a few bytes per row already read until it is closed."""
        parquet_file = self.open(uri)
        for group in range(parquet_file.num_row_groups):
            yield from parquet_file.read_row_group(group, columns=columns).to_batches(max_chunksize=batch_size)

    def history_uri(self, day: date, suffix: str = "parquet") -> str:
        """The storage history's file for ``day`` (one per day, replaced when the day is rebuilt)."""
        _, base = self._filesystem()
        return self._to_uri(f"{base}/history/{day.isoformat()}.{suffix}")

    def read_history(self, schema: pa.Schema) -> pa.Table:
        """Every day of the storage history in one table (empty when none was written)."""
        filesystem, base = self._filesystem()
        infos = filesystem.get_file_info(pafs.FileSelector(f"{base}/history", allow_not_found=True))
        paths = sorted(info.path for info in infos if info.base_name.endswith(".parquet"))
        import pyarrow.dataset as pads  # only the history's readers need it

        return pads.dataset(paths, schema=schema, filesystem=filesystem).to_table() if paths else schema.empty_table()

    def expired(self, bucket: str, now: datetime, retention: timedelta) -> list[str]:
        """This bucket's manifests written more than ``retention`` before ``now``."""
        filesystem, base = self._filesystem()
        cutoff = ensure_utc(now) - retention
        found: list[str] = []
        for kind in MANIFEST_KINDS:
            selector = pafs.FileSelector(f"{base}/{kind}/{bucket}", allow_not_found=True)
            for info in filesystem.get_file_info(selector):
                written = _written_at(info.base_name)
                if info.type == pafs.FileType.File and info.base_name.endswith(".parquet") and \
                        written is not None and written < cutoff:
                    found.append(self._to_uri(info.path))
        return found

    def remove(self, uris: list[str]) -> list[str]:
        """Delete these manifests; returns them."""
        filesystem, _ = self._filesystem()
        for uri in uris:
            filesystem.delete_file(self._to_path(uri))
        return uris

    def prune(self, bucket: str, now: datetime, retention: timedelta, keep: set[str]) -> list[str]:
        """Delete this bucket's manifests older than ``retention``, except the URIs in ``keep``."""
        return self.remove([uri for uri in self.expired(bucket, now, retention) if uri not in keep])


def _written_at(file_name: str) -> datetime | None:
    try:
        return datetime.strptime(file_name.split("-", 1)[0], _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


class BackgroundWriter:
    """``write_batch`` on a thread of its own, a few batches behind the caller.

    Parquet encoding releases the GIL, so a batch is encoded while the caller prepares the
    next. A failure of the writer is raised at the caller's next ``write_batch`` or at ``close``.
    """

    def __init__(self, writer: pq.ParquetWriter, depth: int = 4) -> None:
        self._writer = writer
        self._batches: queue.Queue[pa.RecordBatch | None] = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="heimdall-manifest-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._batches.get()) is not None:
            if self._failure is None:  # after a failure, only drain, so the caller never blocks
                try:
                    self._writer.write_batch(batch)
                except BaseException as exc:  # handed to the caller
                    self._failure = exc

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if self._failure is not None:
            raise self._failure
        self._batches.put(batch)

    def close(self) -> None:
        """Wait until every batch is written; raise the writer's failure, if any."""
        self._batches.put(None)
        self._thread.join()
        if self._failure is not None:
            raise self._failure


@contextmanager
def in_background(writer: pq.ParquetWriter, depth: int = 4) -> Iterator[BackgroundWriter]:
    """``writer`` behind a ``BackgroundWriter``; every batch is written when the block ends."""
    background = BackgroundWriter(writer, depth)
    try:
        yield background
    except BaseException:
        with suppress(BaseException):  # the caller's error is the one to report
            background.close()
        raise
    background.close()
