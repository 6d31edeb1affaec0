"""Batched deletion: re-validate every batch, delete, record; or, in a dry run, only record.

For each batch of at most ``batch_size`` keys, in this order: the reference sources are
queried again for exactly these keys while each object is stat'ed, and ``deletion_verdict``
decides. Survivors are written to the audit log as pending, deleted with one
DeleteObjects request (retried on transient failures; with ``conditional_deletes``, naming each
object's ETag as a condition), then marked deleted, not deleted (the server refused the
condition) or failed.

Deletion is bound by request latency, not by the client: the job keeps ``workers``
DeleteObjects requests in flight and re-validates the next batches meanwhile, so a request
slot never waits for a check; a batch whose check is older than ``REVALIDATION_MAX_AGE``
when its slot comes is checked again.
"""

from __future__ import annotations

import random
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from sqlalchemy.engine import Connection, Engine

from heimdall_storage_pipeline.core.audit import AuditLog, Mark
from heimdall_storage_pipeline.core.clock import Clock, utc_datetimes, utc_now
from heimdall_storage_pipeline.core.companions import owners_under
from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.keys import InvalidKeyError, normalize_key
from heimdall_storage_pipeline.core.list_objects_v2 import VERSIONED, ListObjectsV2
from heimdall_storage_pipeline.core.manifests import DELETIONS_SCHEMA, ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy
from heimdall_storage_pipeline.core.quarantine import (
    COPY_READ_TIMEOUT,
    checked_object_remains,
    copy_to_quarantine,
    discard_copies,
    move_id,
)
from heimdall_storage_pipeline.core.references import read_only_snapshot
from heimdall_storage_pipeline.core.revalidation import Version, fresh_versions, referenced_among, stat_objects
from heimdall_storage_pipeline.core.s3 import S3Settings, make_client, s3_errors
from heimdall_storage_pipeline.core.safety import Candidate, Outcome, age_cutoff, deletion_verdict, same_second

DELETE_WORKERS = 4  # DeleteObjects requests in flight at once; S3 servers take parallel requests well
# A batch's DeleteObjects starts at most this long after its re-validation, or it is re-validated
# again. Batches re-validate while earlier ones delete, so they usually wait for a request slot.
REVALIDATION_MAX_AGE = 2.0
SETTLE_BACKLOG = 4  # finished batches waiting for an older one, per worker
# At most one progress line per bucket this often, besides the first and the last batch's:
# each line is an event in Dagster's event log, and a large bucket has thousands of batches.
PROGRESS_SECONDS = 10.0
DELETE_REQUEST_TIMEOUT = 30.0  # seconds a DeleteObjects request may take before it counts as failed
MAX_FAILED_SHARE = 0.10  # more failed keys than this in one batch stops the bucket
DELETE_ATTEMPTS = 5
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}

Log = Callable[[str], None]


class DeletionAbortedError(StorageCleanupError):
    """Too many keys of a batch failed; the rest of the bucket is left alone."""


@dataclass
class DeletionReport:
    bucket: str
    dry_run: bool
    candidates: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    deleted_bytes: int = 0
    would_delete_bytes: int = 0
    batches: int = 0
    revalidation_seconds: float = 0.0
    revalidated_again: int = 0
    delete_seconds: float = 0.0
    seconds: float = 0.0
    manifest_uri: str = ""
    failures: list[str] = field(default_factory=list)  # a sample of "key: error"
    reconciled: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: Outcome) -> int:
        return self.outcomes.get(outcome.value, 0)


def too_many_failures(failed: int, batch_size: int) -> bool:
    return failed > MAX_FAILED_SHARE * batch_size


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


@dataclass(frozen=True)
class DeleteIfUnchanged(DeleteObject):
    """A DeleteObjects entry that holds only while the object still has ``etag``.

    Servers that implement S3's conditional deletes (SeaweedFS does) answer
    ``PreconditionFailed`` for an object rewritten with other content since it was checked,
    which closes the gap between the fresh stat and the request; others ignore the condition.
    """

    etag: str = ""

    def toxml(self, element: ET.Element | None) -> ET.Element:
        element = super().toxml(element)
        if self.etag:
            ET.SubElement(element, "ETag").text = f'"{self.etag}"'
        return element


@dataclass(frozen=True)
class DeleteError:
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def delete_batch(client: Minio, bucket: str, objects: list[DeleteObject], log: Log,
                 sleep: Callable[[float], None] = time.sleep,
                 before_attempt: Callable[[list[DeleteObject]], list[DeleteObject]] | None = None,
                 ) -> dict[str, DeleteError]:
    """One DeleteObjects request, retried with backoff and jitter; returns each refused key's error.

    ``before_attempt`` sees the objects before every attempt, the first and each retry, and returns
    those still to be sent (the caller re-validates a check that has grown too old). DeleteObjects is
    idempotent (a missing key is a success; with a condition, ``NoSuchKey``), so a retry after an
    ambiguous failure cannot do harm.
    """
    for attempt in range(1, DELETE_ATTEMPTS + 1):
        if before_attempt is not None:
            objects = before_attempt(objects)
            if not objects:
                return {}
        try:
            # remove_objects is lazy: nothing is deleted until its result is iterated.
            errors = list(client.remove_objects(bucket, objects))
            return {error.name: DeleteError(error.code, error.message) for error in errors}
        except Exception as exc:
            if not _is_transient(exc) or attempt == DELETE_ATTEMPTS:
                raise
            delay = min(8.0, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random())
            log(f"DeleteObjects on {bucket} failed ({type(exc).__name__}); retry {attempt} in {delay:.2f} s")
            sleep(delay)
    raise AssertionError("unreachable")


def _deletions_batch(rows: list[tuple[Candidate, str]]) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array([c.key for c, _ in rows], pa.string()),
            pa.array([c.size for c, _ in rows], pa.int64()),
            pa.array([c.last_modified for c, _ in rows], DELETIONS_SCHEMA.field("last_modified").type),
            pa.array([c.etag for c, _ in rows], pa.string()),
            pa.array([o for _, o in rows], pa.string()),
        ],
        schema=DELETIONS_SCHEMA,
    )


def _normalised(candidate: Candidate) -> str | None:
    try:
        return normalize_key(candidate.key)
    except InvalidKeyError:
        return None


@dataclass
class DeletionContext:
    """Everything a deletion needs besides its candidates."""

    s3: S3Settings
    engine: Engine
    store: ManifestStore
    audit: AuditLog | None  # None only for dry runs
    run_id: str
    job: str
    log: Log
    clock: Clock = utc_now
    sleep: Callable[[float], None] = time.sleep
    # Opens the connection references are re-checked through (the purge's dry run passes
    # its uncommitted transaction).
    references: Callable[[Engine], AbstractContextManager[Connection]] = read_only_snapshot
    workers: int = DELETE_WORKERS  # DeleteObjects requests in flight
    # Batches re-validated while ``workers`` others delete, so that a request slot rarely waits
    # for a re-validation (at most REVALIDATION_MAX_AGE old when used). None: half as many as
    # workers, at least one: a check takes a fraction of a delete, and each is a listing request.
    revalidate_ahead: int | None = None
    # Name each object's ETag as a DeleteObjects condition (``DeleteIfUnchanged``). Off by default:
    # it costs the server CPU per key, and the stat just before the request already bounds the
    # window it closes to REVALIDATION_MAX_AGE.
    conditional_deletes: bool = False
    plan_id: str | None = None  # the plan a live run applies, recorded with each audit row
    # The folder this run's quarantine moves go under (``quarantine.move_id``); empty: made from the
    # clock and run id when the deletion starts.
    move_id: str = ""

    @property
    def threads(self) -> int:
        ahead = max(1, self.workers // 2) if self.revalidate_ahead is None else self.revalidate_ahead
        return self.workers + ahead


@dataclass
class BatchResult:
    """One batch's outcome, built by a worker and merged into the report by the caller."""

    rows: list[tuple[Candidate, str]]
    revalidation_seconds: float = 0.0
    delete_seconds: float = 0.0
    revalidated_again: int = 0  # keys checked a second time after waiting for a request slot
    failures: dict[str, str] = field(default_factory=dict)

    def count(self, *outcomes: Outcome) -> int:
        return sum(1 for _, o in self.rows if o in outcomes)

    def bytes(self, outcome: Outcome) -> int:
        return sum(c.size for c, o in self.rows if o == outcome)


def delete_candidates(
    ctx: DeletionContext,
    bucket: BucketPolicy,
    candidates: Iterable[Candidate],
    *,
    dry_run: bool,
    batch_size: int,
    total: int | None = None,
    age_exempt: bool = False,
) -> DeletionReport:
    """Re-validate and delete ``candidates`` of ``bucket`` in batches; see the module doc.

    Batches are disjoint: ``ctx.workers`` of them delete at once while up to
    ``ctx.revalidate_ahead`` more re-validate, each taking the next free DeleteObjects slot
    within REVALIDATION_MAX_AGE of its check (or checking again). Results are merged here, in
    batch order, and at most a few batches are in flight, so memory does not grow with the bucket.
    """
    if not dry_run and ctx.audit is None:
        raise ValueError("a live deletion needs an audit log")
    if bucket.quarantine and not ctx.move_id:
        ctx = replace(ctx, move_id=move_id(ctx.clock(), ctx.run_id))
    report = DeletionReport(bucket=bucket.name, dry_run=dry_run)
    began = time.perf_counter()
    # A stalled server holds a DeleteObjects at most this long: it bounds how old a check can be when
    # the server carries the delete out (REVALIDATION_MAX_AGE before sending, plus this).
    client = make_client(ctx.s3, read_timeout=DELETE_REQUEST_TIMEOUT)
    # Server-side copies of big objects take longer than a delete: their own client, bounded too.
    copier = make_client(ctx.s3, read_timeout=COPY_READ_TIMEOUT) if bucket.quarantine and not dry_run else client
    lister = ListObjectsV2(ctx.s3, bucket.name)
    with s3_errors(ctx.s3, bucket.name):
        # Asked now, not taken from the scan: a delete without version ids frees nothing on a versioned bucket.
        versioned = lister.versioning() in VERSIONED
    if ctx.audit is not None and not dry_run:
        with s3_errors(ctx.s3, bucket.name):
            report.reconciled = ctx.audit.reconcile(
                bucket.name, lambda keys: stat_objects(client, bucket.name, keys, lister), ctx.clock(),
                discard=lambda locations: discard_copies(client, locations),
                versions=lambda keys: {key: {v.version_id for v in found}
                                       for key, found in fresh_versions(lister, keys).items()},
            )
        if any(report.reconciled.values()):
            ctx.log(f"{bucket.name}: settled pending audit rows of an earlier run: {report.reconciled}")
    batches_total = -(-total // batch_size) if total else None
    uri = ctx.store.new_uri("deletions", bucket.name, ctx.clock(), ctx.run_id)
    with ctx.store.writer(uri, DELETIONS_SCHEMA) as writer, ThreadPoolExecutor(ctx.threads) as pool:
        slots = threading.BoundedSemaphore(ctx.workers)
        # At most as many first checks at once as batches re-validate ahead: at the start all
        # threads would otherwise list at once and the first request would go out last.
        checks = threading.BoundedSemaphore(max(1, ctx.threads - ctx.workers))
        in_flight: deque[Future[BatchResult]] = deque()  # in batch order, running or finished

        logged: tuple[float, int] | None = None  # when the last progress line was logged, after which batch

        def log_progress() -> None:
            nonlocal logged
            now = time.perf_counter()
            logged = (now, report.batches)
            outcome = Outcome.WOULD_DELETE if dry_run else Outcome.DELETED
            ctx.log(
                f"{bucket.name}: batch {report.batches} of {batches_total or '?'}: {report.candidates} keys "
                f"so far, {report.count(outcome)} {'would be deleted' if dry_run else 'deleted'} "
                f"({report.would_delete_bytes if dry_run else report.deleted_bytes} bytes), "
                f"{report.candidates / (now - began):.0f} keys/s"
            )

        def settle_oldest() -> None:
            result = in_flight.popleft().result()  # re-raises a worker's failure
            report.batches += 1
            _merge(report, result)
            writer.write_batch(_deletions_batch(result.rows))
            if logged is None or time.perf_counter() - logged[0] >= PROGRESS_SECONDS:
                log_progress()
            failed = result.count(Outcome.FAILED)
            if too_many_failures(failed, len(result.rows)):
                raise DeletionAbortedError(
                    f"{failed} of {len(result.rows)} keys of a batch in {bucket.name} failed to delete "
                    f"(first: {list(result.failures.items())[:3]}); stopped this bucket. Check the S3 "
                    f"server's health and permissions, then launch the job again: it resumes safely"
                )

        def settle_finished() -> None:
            while in_flight and in_flight[0].done():
                settle_oldest()
            # A failing batch stops the bucket as soon as it finishes, not when its turn comes:
            # settling up to it raises its error.
            if any(future.done() and _stops_bucket(future) for future in in_flight):
                while in_flight:
                    settle_oldest()

        try:
            for batch in batched(candidates, batch_size):
                # A free worker takes the next batch even while an older one still runs (no
                # head-of-line wait); finished batches queue for the manifest, bounded by the cap.
                while (sum(not f.done() for f in in_flight) >= ctx.threads
                       or len(in_flight) >= ctx.threads * SETTLE_BACKLOG):
                    wait([f for f in in_flight if not f.done()] or in_flight, return_when=FIRST_COMPLETED)
                    settle_finished()
                in_flight.append(pool.submit(_process_batch, ctx, bucket, batch, client, lister, slots,
                                             checks, dry_run=dry_run, age_exempt=age_exempt, versioned=versioned,
                                             copier=copier))
            while in_flight:
                settle_oldest()
            if logged is not None and logged[1] < report.batches:
                log_progress()  # the last batch
        except BaseException:
            # Let the batches already running finish and record themselves; start no more.
            for future in in_flight:
                future.cancel()
            wait(in_flight)
            raise
    report.manifest_uri = uri
    report.seconds = time.perf_counter() - began
    return report


def _stops_bucket(finished: Future[BatchResult]) -> bool:
    if finished.exception() is not None:
        return True
    result = finished.result()
    return too_many_failures(result.count(Outcome.FAILED), len(result.rows))


def _merge(report: DeletionReport, result: BatchResult) -> None:
    report.candidates += len(result.rows)
    report.outcomes.update(outcome for _, outcome in result.rows)
    report.deleted_bytes += result.bytes(Outcome.DELETED)
    report.would_delete_bytes += result.bytes(Outcome.WOULD_DELETE)
    report.revalidation_seconds += result.revalidation_seconds
    report.delete_seconds += result.delete_seconds
    report.revalidated_again += result.revalidated_again
    report.failures += [f"{k}: {e}" for k, e in result.failures.items()][: max(0, 10 - len(report.failures))]


def _process_batch(
    ctx: DeletionContext,
    bucket: BucketPolicy,
    batch: list[Candidate],
    client: Minio,
    lister: ListObjectsV2,
    slots: threading.Semaphore,
    checks: threading.Semaphore,
    *,
    dry_run: bool,
    age_exempt: bool,
    versioned: bool = False,
    copier: Minio | None = None,
) -> BatchResult:
    began = time.perf_counter()
    with checks:
        rows, deletable = _revalidate(ctx, bucket, batch, client, lister, age_exempt)
        if versioned and deletable:
            changed, deletable = _with_versions(ctx, bucket.name, deletable, lister)
            rows += changed
    checked = time.perf_counter()
    result = BatchResult(rows=rows, revalidation_seconds=checked - began)
    if dry_run:
        rows += [(c, Outcome.WOULD_DELETE.value) for c in deletable]
    elif deletable:
        assert ctx.audit is not None
        # The intent is written before the wait for a slot, so that the slot holds only the request.
        quarantine = bucket.quarantine
        moved_to = (lambda key: quarantine.location(bucket.name, key, ctx.move_id)) if quarantine else None
        audit_ids = ctx.audit.record_intent(run_id=ctx.run_id, job=ctx.job, bucket=bucket.name, candidates=deletable,
                                            at=ctx.clock(), plan_id=ctx.plan_id, quarantine=moved_to)
        marks: list[Mark] = []
        copied: set[str] = set()

        def still_deletable(objects: list[DeleteObject]) -> list[DeleteObject]:
            """Before each request, the first or a retry: with a quarantine, what is still deletable is
            copied there first; then a check older than the bound (the copies take time) is made again."""
            nonlocal deletable, checked
            if moved_to is not None:
                failed = copy_to_quarantine(copier or client, bucket.name, moved_to,
                                            [c for c in deletable if c.key not in copied])
                copied.update(c.key for c in deletable if c.key not in failed)
                rows.extend((c, Outcome.FAILED.value) for c in deletable if c.key in failed)
                result.failures.update(failed)
                marks.extend(Mark([audit_ids[key]], "failed", error=error) for key, error in failed.items())
                deletable = [c for c in deletable if c.key not in failed]
                objects = _delete_objects(ctx, deletable)
            if time.perf_counter() - checked > REVALIDATION_MAX_AGE:
                again = time.perf_counter()
                skipped, deletable = _revalidate(ctx, bucket, deletable, client, lister, age_exempt)
                checked = again
                rows.extend(skipped)
                result.revalidated_again += len(skipped) + len(deletable)
                result.revalidation_seconds += time.perf_counter() - again
                marks.extend(Mark([audit_ids[key] for key in keys], "not_deleted",
                                  error=f"{outcome} when checked again")
                             for outcome, keys in _keys_by_outcome(skipped).items())
                objects = _delete_objects(ctx, deletable)  # the copies of the skipped go after the request
            return objects

        with slots:  # one of ctx.workers DeleteObjects requests in flight
            errors = _delete(ctx, bucket.name, deletable, client, result, still_deletable)
        # After the slot, so that the next request goes out first; every row of the intent gets
        # its final status in the transaction that closes the intent.
        outcomes, final = _outcomes(deletable, audit_ids, errors, ctx.clock)
        rows += outcomes
        if moved_to is not None:
            deleted = {c.key for c, outcome in outcomes if outcome == Outcome.DELETED.value}
            settled, moved = _settle_copies(ctx, bucket.name, client, lister, moved_to, audit_ids,
                                            [c for c in batch if c.key in copied - deleted])
            final += settled
            # The manifest says what the audit log says: moved, though the delete was not confirmed.
            rows[:] = [(c, Outcome.DELETED.value if c.key in moved else outcome) for c, outcome in rows]
            for key in moved:
                result.failures.pop(key, None)
        ctx.audit.finish(marks + final, intents=[min(audit_ids.values())])
    return result


def _settle_copies(
    ctx: DeletionContext, bucket: str, client: Minio, lister: ListObjectsV2,
    moved_to: Callable[[str], tuple[str, str]], audit_ids: dict[str, int], stayed: list[Candidate],
) -> tuple[list[Mark], set[str]]:
    """Copies whose original was not reported deleted: removed where the checked object still sits at
    its key (no object is kept twice); kept where it is gone or replaced, and its row then records the move.

    Returns the audit marks and the keys recorded as moved.
    """
    if not stayed:
        return [], set()
    with s3_errors(ctx.s3, bucket):
        stats = stat_objects(client, bucket, [c.key for c in stayed], lister)
        duplicates = {c.key for c in stayed if checked_object_remains(stats[c.key], c.etag, c.last_modified)}
        discard_copies(client, [moved_to(key) for key in duplicates])
    moved = {c.key for c in stayed} - duplicates
    return [Mark([audit_ids[key] for key in moved], "deleted", ctx.clock(),
                 "the delete was not confirmed, but the checked object is gone from its key; its quarantine copy "
                 "holds it")], moved


def _revalidate(
    ctx: DeletionContext, bucket: BucketPolicy, batch: list[Candidate], client: Minio, lister: ListObjectsV2,
    age_exempt: bool,
) -> tuple[list[tuple[Candidate, str]], list[Candidate]]:
    """The skipped candidates with their outcome, and those that may be deleted now."""
    # 1. references, fresh, for exactly these keys and the keys whose companions they are (a key
    # we cannot normalise is never deleted), read while 2. the objects are stat'ed, fresh: both
    # finish before 3. the one decision.
    normalised = {c.key: _normalised(c) for c in batch}
    owners = {key: owners_under(bucket.companions, key) for key in normalised.values() if key}
    asked = set(owners).union(*(found for found in owners.values() if found))

    def fresh_references() -> set[str]:
        with ctx.references(ctx.engine) as connection:
            return referenced_among(connection, bucket, asked)

    with ThreadPoolExecutor(1) as side:
        references = side.submit(fresh_references)
        with s3_errors(ctx.s3, bucket.name):
            stats = stat_objects(client, bucket.name, [c.key for c in batch], lister)
        referenced = references.result()
    now = ctx.clock()
    skipped: list[tuple[Candidate, str]] = []
    deletable: list[Candidate] = []
    for candidate in batch:
        key = normalised[candidate.key]
        verdict = deletion_verdict(
            candidate,
            # A companion of a referenced key is as referenced as its owner; too many owners to tell: kept.
            referenced_now=key is None or key in referenced or owners[key] is None
            or not owners[key].isdisjoint(referenced),
            stat=stats[candidate.key],
            min_age=bucket.min_age,
            now=now,
            age_exempt=age_exempt,
        )
        if verdict is None:
            deletable.append(candidate)
        else:
            skipped.append((candidate, verdict.value))
    return skipped, deletable


def _with_versions(ctx: DeletionContext, bucket: str, batch: list[Candidate], lister: ListObjectsV2
                   ) -> tuple[list[tuple[Candidate, str]], list[Candidate]]:
    """Each candidate with every version of its key (and their bytes), if its latest version is the one checked."""
    with s3_errors(ctx.s3, bucket):
        versions = fresh_versions(lister, [c.key for c in batch])
    skipped: list[tuple[Candidate, str]] = []
    ready: list[Candidate] = []
    for candidate in batch:
        found = versions[candidate.key]
        latest = next((v for v in found if v.is_latest), None)
        if latest is None or latest.delete_marker:
            skipped.append((candidate, Outcome.SKIPPED_MISSING.value))
        # The same bytes uploaded again are a new, young version with the same ETag: the time tells.
        elif latest.etag != candidate.etag.strip('"') or not same_second(latest.last_modified,
                                                                          candidate.last_modified):
            skipped.append((candidate, Outcome.SKIPPED_CHANGED.value))
        else:
            ready.append(replace(candidate, size=sum(v.size for v in found),
                                 version_ids=tuple(v.version_id for v in found)))
    return skipped, ready


def _keys_by_outcome(rows: list[tuple[Candidate, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for candidate, outcome in rows:
        grouped.setdefault(outcome, []).append(candidate.key)
    return grouped


# Refusals of a conditional delete that mean the object is not the one checked: skipped, not failed.
_REFUSED_AS = {"PreconditionFailed": Outcome.SKIPPED_CHANGED, "NoSuchKey": Outcome.SKIPPED_MISSING}


def _delete_objects(ctx: DeletionContext, deletable: list[Candidate]) -> list[DeleteObject]:
    # A version id names exactly the version checked: no ETag condition needed.
    return [DeleteObject(c.key, version_id) for c in deletable for version_id in c.version_ids] + [
        DeleteIfUnchanged(c.key, etag=c.etag) if ctx.conditional_deletes else DeleteObject(c.key)
        for c in deletable if not c.version_ids]


def _delete(
    ctx: DeletionContext, bucket: str, deletable: list[Candidate], client: Minio, result: BatchResult,
    before_attempt: Callable[[list[DeleteObject]], list[DeleteObject]],
) -> dict[str, DeleteError]:
    """Send DeleteObjects for ``deletable`` (their intent is recorded); returns ``{key: error}``."""
    delete_began = time.perf_counter()
    with s3_errors(ctx.s3, bucket):
        errors = delete_batch(client, bucket, _delete_objects(ctx, deletable), ctx.log, ctx.sleep, before_attempt)
    result.delete_seconds = time.perf_counter() - delete_began
    result.failures.update({key: str(error) for key, error in errors.items() if error.code not in _REFUSED_AS})
    return errors


def _outcomes(
    deletable: list[Candidate], audit_ids: dict[str, int], errors: dict[str, DeleteError], clock: Clock
) -> tuple[list[tuple[Candidate, str]], list[Mark]]:
    """Each sent key's outcome, and the audit marks that record them: deleted, not deleted or failed."""
    rows: list[tuple[Candidate, str]] = []
    # (status, error) -> audit row ids: one statement per distinct outcome, not per key.
    ids_by_mark: dict[tuple[str, str | None], list[int]] = {}
    for candidate in deletable:
        error = errors.get(candidate.key)
        refused = _REFUSED_AS.get(error.code) if error else None
        if error is None:
            outcome, status, reason = Outcome.DELETED, "deleted", None
        elif refused is not None:
            outcome, status, reason = refused, "not_deleted", f"{refused} when deleted ({error})"
        else:
            outcome, status, reason = Outcome.FAILED, "failed", str(error)
        ids_by_mark.setdefault((status, reason), []).append(audit_ids[candidate.key])
        rows.append((candidate, outcome.value))
    marks = [Mark(ids, status, clock() if status == "deleted" else None, reason)
             for (status, reason), ids in ids_by_mark.items()]
    return rows, marks


def manifest_candidates(
    store: ManifestStore, uri: str, column: str, selected: Callable[[pa.Array], pa.Array],
    max_objects: int | None = None,
) -> Iterator[Candidate]:
    """The rows of a manifest whose ``column`` is ``selected``, as candidates, streamed."""
    produced = 0
    for batch in store.iter_batches(uri, columns=["key", "size", "last_modified", "etag", column]):
        rows = batch.filter(selected(batch.column(column)))
        for key, size, last_modified, etag in zip(
            rows.column("key").to_pylist(), rows.column("size").to_pylist(),
            utc_datetimes(rows.column("last_modified")), rows.column("etag").to_pylist(), strict=True,
        ):
            if max_objects is not None and produced >= max_objects:
                return
            produced += 1
            yield Candidate(key=key, size=size, last_modified=last_modified, etag=etag)


def candidates_from_orphans(store: ManifestStore, uri: str, max_objects: int | None = None) -> Iterator[Candidate]:
    """Eligible orphans of an orphan manifest, streamed."""
    return manifest_candidates(store, uri, "eligible", lambda eligible: eligible, max_objects)


@dataclass
class NoncurrentReport:
    """What the noncurrent pass over a versioned bucket removed (or, in a dry run, would remove)."""

    dry_run: bool
    versions: int = 0  # noncurrent versions, delete markers excluded
    bytes: int = 0
    delete_markers: int = 0
    failed_keys: int = 0


def expired_versions(versions: list[Version], cutoff: datetime) -> list[Version]:
    """The versions noncurrent since ``cutoff`` or earlier, and a latest delete marker left with nothing behind."""
    old = [v for v in versions if not v.is_latest and v.noncurrent_since is not None and v.noncurrent_since <= cutoff]
    rest = [v for v in versions if v not in old]
    return old + rest if len(rest) == 1 and rest[0].delete_marker else old


def keys_with_noncurrent(store: ManifestStore, versions_uri: str) -> Iterator[str]:
    """Keys of a versions manifest with a noncurrent version or a delete marker, once each, in listing order."""
    last = None
    for batch in store.iter_batches(versions_uri, columns=["key", "is_latest", "delete_marker"]):
        rows = batch.filter(pc.or_(pc.invert(batch.column("is_latest")), batch.column("delete_marker")))
        for key in rows.column("key").to_pylist():
            if key != last:  # a key's versions are listed together
                last = key
                yield key


def delete_noncurrent(ctx: DeletionContext, bucket: BucketPolicy, keys: Iterable[str], *, dry_run: bool,
                      batch_size: int) -> NoncurrentReport:
    """Remove the versions noncurrent for ``bucket.noncurrent_min_age`` and the delete markers left alone.

    Each batch's versions are listed fresh and removed by version id, so a current version is never
    touched; audited under ``<run id>/noncurrent``, one row per key with its version ids. A listing
    older than REVALIDATION_MAX_AGE when a request goes out (the first or a retry) is made again, and a
    key whose chosen versions are no longer all expired (a delete marker removed: an older version is
    current again) is left whole, recorded as not deleted.
    """
    report = NoncurrentReport(dry_run)
    if bucket.noncurrent_min_age is None:
        return report
    min_age = bucket.noncurrent_min_age
    client = make_client(ctx.s3, read_timeout=DELETE_REQUEST_TIMEOUT)
    lister = ListObjectsV2(ctx.s3, bucket.name)
    for batch in batched(keys, batch_size):
        with s3_errors(ctx.s3, bucket.name):
            found = fresh_versions(lister, batch)
        listed = time.perf_counter()
        cutoff = age_cutoff(ctx.clock(), min_age)
        chosen = {key: expired for key in batch if (expired := expired_versions(found[key], cutoff))}
        candidates = [Candidate(key, sum(v.size for v in vs), max(v.last_modified for v in vs), "",
                                tuple(v.version_id for v in vs)) for key, vs in chosen.items()]
        errors: dict[str, DeleteError] = {}
        if candidates and not dry_run:
            assert ctx.audit is not None
            ids = ctx.audit.record_intent(run_id=f"{ctx.run_id}/noncurrent"[:64], job=ctx.job, bucket=bucket.name,
                                          candidates=candidates, at=ctx.clock())

            # Before each request, the first or a retry: a listing older than the bound is made again.
            def still_expired(objects: list[DeleteObject]) -> list[DeleteObject]:
                nonlocal listed, candidates
                if time.perf_counter() - listed <= REVALIDATION_MAX_AGE:
                    return objects
                again = time.perf_counter()
                with s3_errors(ctx.s3, bucket.name):
                    fresh = fresh_versions(lister, [c.key for c in candidates])
                listed = again
                candidates = _still_expired(candidates, fresh, age_cutoff(ctx.clock(), min_age))
                return _delete_objects(ctx, candidates)

            with s3_errors(ctx.s3, bucket.name):
                errors = delete_batch(client, bucket.name, _delete_objects(ctx, candidates), ctx.log, ctx.sleep,
                                      still_expired)
            sent = {c.key for c in candidates}
            changed = [key for key in chosen if key not in sent]
            for key in changed:
                chosen.pop(key)
            ctx.audit.finish([*_outcomes(candidates, ids, errors, ctx.clock)[1],
                              Mark([ids[key] for key in changed], "not_deleted",
                                   error=f"{Outcome.SKIPPED_CHANGED} when checked again")],
                             intents=[min(ids.values())])
        for key, versions in chosen.items():
            report.failed_keys += key in errors
            if key not in errors:
                report.versions += sum(not v.delete_marker for v in versions)
                report.bytes += sum(v.size for v in versions)
                report.delete_markers += sum(v.delete_marker for v in versions)
    return report


def _still_expired(candidates: list[Candidate], fresh: dict[str, list[Version]], cutoff: datetime
                   ) -> list[Candidate]:
    """The candidates each of whose chosen versions is either gone or still expired in ``fresh``.

    A version now latest (its delete marker removed) or a lone delete marker with versions behind it
    again is no longer expired: its key is left whole, so that its audit row names exactly what went.
    """
    kept = []
    for candidate in candidates:
        versions = fresh[candidate.key]
        expired = {v.version_id for v in expired_versions(versions, cutoff)}
        present = {v.version_id for v in versions}
        if all(version_id in expired or version_id not in present for version_id in candidate.version_ids):
            kept.append(candidate)
    return kept
