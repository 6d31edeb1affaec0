"""Bucket listing into Arrow: S3 ListObjectsV2 requests signed by botocore's SigV4 signer, sent by
urllib3 (time limits, retries), read by lxml, optionally sharded by prefix over threads.

Keys are exactly the raw listing's (``encoding-type=url``, decoded as minio does); objects whose
key ends in ``/`` (directory markers) are skipped, as minio reports them ``is_dir``.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from lxml import etree
from minio.error import S3Error

from heimdall_storage_pipeline.core.errors import StorageCleanupError
from heimdall_storage_pipeline.core.manifests import INVENTORY_SCHEMA, VERSIONS_SCHEMA
from heimdall_storage_pipeline.core.s3 import S3Settings, http_pool

S3_MAX_KEYS = 1000  # the page cap of AWS S3 and MinIO
DEFAULT_WORKERS = 4  # concurrent shard listings; the server, not this process, is the limit
PREFETCH_PAGES = 4  # pages listed ahead of the caller per worker: bounds memory at a few pages
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_TIMESTAMP = INVENTORY_SCHEMA.field("last_modified").type
_FIELDS = ("Key", "Size", "LastModified", "ETag")
VERSIONED = ("Enabled", "Suspended")  # states whose deletes need version ids to free bytes


@dataclass(frozen=True)
class Page:
    objects: pa.RecordBatch  # INVENTORY_SCHEMA rows, directory markers left out
    prefixes: list[str]  # the <CommonPrefixes> of a delimiter listing
    next_token: str | None  # None on the last page


def parse_page(body: bytes) -> Page:
    """One ListObjectsV2 response body as Arrow rows, common prefixes and the next continuation token."""
    # A parser per call: lxml releases the GIL while it parses only with the calling thread's parser.
    root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
    ns = root.tag[: root.tag.find("}") + 1]  # the S3 namespace, or "" where a server sends none
    url_encoded = root.findtext(ns + "EncodingType") == "url"
    keys, sizes, modified, etags = _object_fields(root, ns)
    if url_encoded:
        keys = [unquote_plus(key) if "%" in key or "+" in key else key for key in keys]
    batch = pa.record_batch(
        [
            pa.array(keys, pa.string()),
            pa.array(sizes, pa.string()).cast(pa.int64()),
            pa.array(modified, pa.string()).cast(_TIMESTAMP),
            pc.replace_substring(pa.array(etags, pa.string()), '"', ""),  # minio drops every '"'
        ],
        schema=INVENTORY_SCHEMA,
    )
    if batch.num_rows:
        batch = batch.filter(pc.invert(pc.ends_with(batch.column(0), "/")))
    prefixes = [p.text or "" for p in root.iterfind(f"{ns}CommonPrefixes/{ns}Prefix")]
    token = None
    if (root.findtext(ns + "IsTruncated") or "").strip().lower() == "true":
        # Like minio: a truncated page without a token continues after its last key.
        token = root.findtext(ns + "NextContinuationToken") or (keys[-1] if keys else None)
        if token is None:
            raise ValueError("the server truncated a listing page without a continuation token")
    return Page(batch, [unquote_plus(p) for p in prefixes] if url_encoded else prefixes, token)


def _object_fields(root: etree._Element, ns: str) -> list[list[str]]:
    """Key, Size, LastModified and ETag of every <Contents>, as text."""
    # Four passes of C iteration; these names occur nowhere else in a ListObjectsV2 body.
    columns = [[element.text or "" for element in root.iter(ns + name)] for name in _FIELDS]
    objects = root.findall(ns + "Contents")
    if all(len(column) == len(objects) for column in columns):
        return columns
    # Some object lacks a field: read object by object.
    rows = [{field.tag.removeprefix(ns): field.text or "" for field in item} for item in objects]
    if any("Key" not in row or "LastModified" not in row for row in rows):
        raise ValueError("an object of the listing has no <Key> or no <LastModified>")
    return [[row.get(name, "0" if name == "Size" else "") for row in rows] for name in _FIELDS]


@dataclass(frozen=True)
class VersionsPage:
    versions: pa.RecordBatch  # VERSIONS_SCHEMA rows in the server's order, directory markers left out
    next_markers: tuple[str, str] | None  # (key-marker, version-id-marker); None on the last page


def parse_versions_page(body: bytes) -> VersionsPage:
    """One ListObjectVersions response body: its <Version> and <DeleteMarker> entries, in order."""
    root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
    ns = root.tag[: root.tag.find("}") + 1]
    rows = [({field.tag.removeprefix(ns): field.text or "" for field in item}, item.tag == ns + "DeleteMarker")
            for item in root if item.tag in (ns + "Version", ns + "DeleteMarker")]
    if any("Key" not in row or "LastModified" not in row for row, _ in rows):
        raise ValueError("a version of the listing has no <Key> or no <LastModified>")
    keys = [row["Key"] for row, _ in rows]
    if root.findtext(ns + "EncodingType") == "url":
        keys = [unquote_plus(key) for key in keys]
    batch = pa.record_batch([
        pa.array(keys, pa.string()),
        pa.array([row.get("VersionId", "null") for row, _ in rows], pa.string()),
        pa.array([row.get("Size", "0") for row, _ in rows], pa.string()).cast(pa.int64()),
        pa.array([row["LastModified"] for row, _ in rows], pa.string()).cast(_TIMESTAMP),
        pa.array([row.get("ETag", "").replace('"', "") for row, _ in rows], pa.string()),
        pa.array([row.get("IsLatest", "").strip().lower() == "true" for row, _ in rows], pa.bool_()),
        pa.array([marker for _, marker in rows], pa.bool_()),
    ], schema=VERSIONS_SCHEMA)
    if batch.num_rows:
        batch = batch.filter(pc.invert(pc.ends_with(batch.column(0), "/")))
    markers = None
    if (root.findtext(ns + "IsTruncated") or "").strip().lower() == "true":
        key_marker = root.findtext(ns + "NextKeyMarker") or (keys[-1] if keys else None)
        if key_marker is None:
            raise ValueError("the server truncated a version listing page without a key marker")
        markers = (key_marker, root.findtext(ns + "NextVersionIdMarker") or "")
    return VersionsPage(batch, markers)


def _error_fields(body: bytes) -> dict[str, str]:
    try:
        root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError:
        return {}
    return {field.tag.rpartition("}")[2]: field.text or "" for field in root}


class ListObjectsV2:
    """Signed ListObjectsV2 GETs on one bucket, over a urllib3 pool."""

    def __init__(self, settings: S3Settings, bucket: str, retries: int = 3) -> None:
        self.settings = settings
        self.bucket = bucket
        self.region = settings.region or "us-east-1"
        self._credentials = Credentials(settings.access_key, settings.secret_key)
        self.http = http_pool(settings, retries)

    def get(self, query: dict[str, str]) -> bytes:
        """GET ``/bucket?query``; an S3 error response raises minio's S3Error, as minio's calls do."""
        query_string = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in query.items())
        url = f"{self.settings.endpoint_url}/{quote(self.bucket)}?{query_string}"
        for _attempt in range(2):
            request = AWSRequest(method="GET", url=url, headers={"X-Amz-Content-SHA256": _EMPTY_SHA256})
            SigV4Auth(self._credentials, "s3", self.region).add_auth(request)
            response = self.http.request("GET", url, headers=dict(request.headers.items()))
            if response.status == 200:
                return response.data
            fields = _error_fields(response.data)
            region = fields.get("Region")
            # AWS names the bucket's region when a request was signed for another one: sign again.
            if fields.get("Code") != "AuthorizationHeaderMalformed" or not region or region == self.region:
                break
            self.region = region
        raise S3Error(
            response, fields.get("Code") or f"HTTP{response.status}", fields.get("Message", ""),
            fields.get("Resource"), fields.get("RequestId"), fields.get("HostId"), bucket_name=self.bucket,
        )

    def pages(
        self, prefix: str = "", start_after: str = "", delimiter: str = "", max_keys: int = S3_MAX_KEYS
    ) -> Iterator[Page]:
        """The pages of one listing, following continuation tokens."""
        query = {"list-type": "2", "encoding-type": "url", "max-keys": str(max_keys), "prefix": prefix,
                 "delimiter": delimiter}
        if start_after:
            query["start-after"] = start_after
        while True:
            body = self.get(query)
            try:
                page = parse_page(body)
            except (etree.XMLSyntaxError, ValueError) as exc:
                raise StorageCleanupError(
                    f"{self.settings.endpoint_url} answered a listing of bucket {self.bucket!r} with a page that "
                    f"is not a readable ListObjectsV2 response ({str(exc).splitlines()[0]}); check that "
                    f"MINIO_ENDPOINT is the S3 API"
                ) from None
            yield page
            if page.next_token is None:
                return
            query.pop("start-after", None)
            query["continuation-token"] = page.next_token

    def versioning(self) -> str:
        """``Enabled``, ``Suspended``, ``Off`` (never enabled, or a server without versioning) or ``Unknown``
        (the key may not ask: the bucket is then listed and cleaned as an unversioned one, as before)."""
        try:
            body = self.get({"versioning": ""})
        except S3Error as exc:
            if exc.code in ("NotImplemented", "HTTP501", "AccessDenied"):
                return "Unknown" if exc.code == "AccessDenied" else "Off"
            raise
        root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
        return root.findtext(root.tag[: root.tag.find("}") + 1] + "Status") or "Off"

    def version_pages(self, prefix: str = "", max_keys: int = S3_MAX_KEYS, delimiter: str = "",
                      key_marker: str = "") -> Iterator[VersionsPage]:
        """The pages of one ListObjectVersions (after ``key_marker``), following the key and version-id markers."""
        query = {"versions": "", "encoding-type": "url", "max-keys": str(max_keys), "prefix": prefix,
                 "delimiter": delimiter, **({"key-marker": key_marker} if key_marker else {})}
        while True:
            try:
                page = parse_versions_page(self.get(query))
            except (etree.XMLSyntaxError, ValueError) as exc:
                raise StorageCleanupError(
                    f"{self.settings.endpoint_url} answered a version listing of bucket {self.bucket!r} with a "
                    f"page that is not a readable ListObjectVersions response ({str(exc).splitlines()[0]}); "
                    f"check that MINIO_ENDPOINT is the S3 API"
                ) from None
            yield page
            if page.next_markers is None:
                return
            query["key-marker"], version_marker = page.next_markers
            query.update({"version-id-marker": version_marker} if version_marker else {})

    def batches(self, prefix: str = "", start_after: str = "", max_keys: int = S3_MAX_KEYS) -> Iterator[pa.RecordBatch]:
        """The objects after ``start_after`` whose key starts with ``prefix``, in server order."""
        for page in self.pages(prefix=prefix, start_after=start_after, max_keys=max_keys):
            yield page.objects


class _Shard(NamedTuple):
    prefix: str
    depth: int
    expand: bool  # list one level with a delimiter (and queue its sub-prefixes) instead of recursively


class _Done(NamedTuple):
    shards: list[_Shard]  # the sub-prefixes a finished shard found


class _Stopped(Exception):
    """The consumer went away; workers unwind quietly."""


def listing_batches(
    lister: ListObjectsV2, max_keys: int = S3_MAX_KEYS, workers: int = 1, max_depth: int = 3
) -> Iterator[pa.RecordBatch]:
    """Every object of the bucket, listed by ``workers`` threads a few pages ahead of the caller.

    With more than one worker the bucket is listed in prefix shards: a delimiter listing of the
    root (whose own objects are kept) finds its prefixes; a level with fewer prefixes than workers
    is split one level deeper (down to ``max_depth``), the others are listed recursively at once.
    Every key is in exactly one shard.
    """
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    out: queue.Queue[pa.RecordBatch | _Done | Exception] = queue.Queue(maxsize=PREFETCH_PAGES * workers)
    stop = threading.Event()

    def put(item: pa.RecordBatch | _Done | Exception) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def list_shard(shard: _Shard) -> list[_Shard]:
        found: list[str] = []
        for page in lister.pages(prefix=shard.prefix, delimiter="/" if shard.expand else "", max_keys=max_keys):
            found += page.prefixes
            put(page.objects)
        deeper = shard.depth + 1 < max_depth and len(found) < workers
        return [_Shard(prefix, shard.depth + 1, deeper) for prefix in found]

    def run(shard: _Shard) -> None:
        try:
            result: _Done | Exception = _Done(list_shard(shard))
        except Exception as exc:  # re-raised by the consumer
            result = exc
        with suppress(_Stopped):
            put(result)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="listing")
    pool.submit(run, _Shard("", 0, expand=workers > 1))
    outstanding = 1
    try:
        while outstanding:
            item = out.get()  # every shard ends in _Done or an error: each request has a time limit
            if isinstance(item, _Done):
                outstanding += len(item.shards) - 1
                for shard in item.shards:
                    pool.submit(run, shard)
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
