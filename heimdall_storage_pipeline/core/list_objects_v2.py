"""Bucket listing at close to server speed: ListObjectsV2 over plain HTTP, regex-parsed.

``minio.list_objects`` is bound by building an ElementTree and one ``Object`` per key. Here a
background thread fetches the next page while the caller's thread parses the current one with a
few regular expressions over the whole body and turns the columns into Arrow arrays in C
(timestamps and sizes are cast by Arrow, not parsed per key in Python).

S3 semantics are kept: continuation tokens, ``encoding-type=url`` (keys are URL-decoded exactly as
minio does), and ``max_keys`` defaults to the 1000-key cap of S3 and MinIO; servers that honour
larger pages (SeaweedFS) can be given more to save round trips. Objects whose key ends in ``/``
(directory markers) are skipped, as ``listing.py`` skips minio's ``is_dir`` entries, so the key
set equals what ``minio.list_objects`` reports as objects.

``core/listing.py`` turns these pages into the inventory manifest.
"""

from __future__ import annotations

import hashlib
import html
import queue
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import quote, unquote_plus, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import urllib3
from minio.credentials import Credentials
from minio.error import S3Error
from minio.signer import sign_v4_s3
from minio.time import from_iso8601utc

from heimdall_storage_pipeline.core.manifests import INVENTORY_SCHEMA
from heimdall_storage_pipeline.core.s3 import S3Settings

S3_MAX_KEYS = 1000  # the page cap of AWS S3 and MinIO
PREFETCH_PAGES = 4  # bodies fetched ahead of the parser per worker; bounds memory at a few pages
DEFAULT_WORKERS = 4  # concurrent shard listings; the server, not this process, is the limit
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_TIMESTAMP = INVENTORY_SCHEMA.field("last_modified").type

# Tags inside <Contents>. ``[^<]*`` is safe: text content never holds a raw '<' in XML.
_KEY = re.compile(r"<Key>([^<]*)</Key>")
_SIZE = re.compile(r"<Size>([^<]*)</Size>")
_ETAG = re.compile(r"<ETag>([^<]*)</ETag>")
_MODIFIED = re.compile(r"<LastModified>([^<]*)</LastModified>")
_CONTENTS = re.compile(r"<Contents>(.*?)</Contents>", re.DOTALL)
_TRUNCATED = re.compile(r"<IsTruncated>\s*true\s*</IsTruncated>", re.IGNORECASE)
_TOKEN = re.compile(r"<NextContinuationToken>([^<]*)</NextContinuationToken>")
_COMMON_PREFIX = re.compile(r"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>")
_URL_ENCODED = re.compile(r"<EncodingType>\s*url\s*</EncodingType>")
_ERROR_FIELD = re.compile(r"<(Code|Message|Resource|RequestId|HostId|Region)>([^<]*)</\1>")


class ListingPageError(ValueError):
    """A listing page this parser cannot read consistently."""


# --- parsing ------------------------------------------------------------------------------------


def _text(value: str) -> str:
    """XML character data to text; most values have no entity, so skip the call then."""
    return html.unescape(value) if "&" in value else value


def _timestamps(values: list[str]) -> pa.Array:
    try:
        return pa.array(values, pa.string()).cast(_TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Formats Arrow's ISO-8601 cast refuses get minio's own parser (and its errors).
        return pa.array([from_iso8601utc(_text(v)) for v in values], _TIMESTAMP)


def _etags(values: list[str]) -> pa.Array:
    """ETags without quotes, as minio gives them (it removes every '"')."""
    array = pa.array(values, pa.string())
    for quote_form in ("&#34;", "&quot;", '"'):
        array = pc.replace_substring(array, quote_form, "")
    if pc.any(pc.match_substring(array, "&")).as_py():
        array = pa.array([_text(v) for v in array.to_pylist()], pa.string())
    return array


def _fields_per_object(body: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """Slow path: one <Contents> element at a time, for pages where a field is missing."""
    keys, sizes, etags, modified = [], [], [], []
    for element in _CONTENTS.findall(body):
        key = _KEY.search(element)
        if key is None:
            raise ListingPageError("a <Contents> element of the listing has no <Key>")
        size, etag, stamp = _SIZE.search(element), _ETAG.search(element), _MODIFIED.search(element)
        keys.append(key.group(1))
        sizes.append(size.group(1) if size else "0")
        etags.append(etag.group(1) if etag else "")
        if stamp is None:
            raise ListingPageError(f"object {key.group(1)!r} of the listing has no <LastModified>")
        modified.append(stamp.group(1))
    return keys, sizes, etags, modified


def parse_page(body: str) -> tuple[pa.RecordBatch, bool, str | None, str | None]:
    """One ListObjectsV2 response body -> (objects, is_truncated, continuation token, last raw key)."""
    keys, sizes, etags, modified = _KEY.findall(body), _SIZE.findall(body), _ETAG.findall(body), (
        _MODIFIED.findall(body)
    )
    expected = body.count("<Contents>")
    if not len(keys) == len(sizes) == len(etags) == len(modified) == expected:
        keys, sizes, etags, modified = _fields_per_object(body)
    last_raw = keys[-1] if keys else None
    url_encoded = _URL_ENCODED.search(body) is not None
    # XML-unescape first (the outer layer), then URL-decode as minio does (unquote_plus).
    if url_encoded:
        keys = [unquote_plus(_text(k)) if ("%" in k or "+" in k or "&" in k) else k for k in keys]
    else:
        keys = [_text(k) for k in keys]
    batch = pa.record_batch(
        [
            pa.array(keys, pa.string()),
            pa.array(sizes, pa.string()).cast(pa.int64()),
            _timestamps(modified),
            _etags(etags),
        ],
        schema=INVENTORY_SCHEMA,
    )
    directories = pc.ends_with(batch.column(0), "/")
    if pc.any(directories).as_py():
        batch = batch.filter(pc.invert(directories))
    truncated = _TRUNCATED.search(body) is not None
    token = _TOKEN.search(body)
    return batch, truncated, _text(token.group(1)) if token else None, last_raw


def common_prefixes(body: str) -> list[str]:
    """The decoded <CommonPrefixes> of a delimiter listing page."""
    found = [_text(p) for p in _COMMON_PREFIX.findall(body)]
    return [unquote_plus(p) for p in found] if _URL_ENCODED.search(body) else found


def _next_token(body: str) -> tuple[bool, str | None]:
    """Just what the fetcher needs to request the next page, without parsing the objects."""
    if _TRUNCATED.search(body) is None:
        return False, None
    token = _TOKEN.search(body)
    if token is not None:
        return True, _text(token.group(1))
    # Like minio: a truncated page without a token continues after its last key.
    keys = _KEY.findall(body)
    if not keys:
        raise ListingPageError("the server truncated a listing page without a continuation token")
    last = _text(keys[-1])
    return True, unquote_plus(last) if _URL_ENCODED.search(body) else last


# --- HTTP ---------------------------------------------------------------------------------------


class ListObjectsV2:
    """Signed ListObjectsV2 GETs on one bucket, over a urllib3 pool."""

    def __init__(self, settings: S3Settings, bucket: str, retries: int = 3) -> None:
        self.settings = settings
        self.bucket = bucket
        self.region = settings.region or "us-east-1"
        self.credentials = Credentials(settings.access_key, settings.secret_key)
        self.http = urllib3.PoolManager(
            maxsize=max(2, settings.max_connections),
            timeout=urllib3.Timeout(connect=5.0, read=120.0),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )

    def get(self, query: dict[str, str]) -> str:
        """GET ``/bucket?query`` and return the body; S3 error responses raise minio's S3Error."""
        for _attempt in range(2):
            response = self._request(query)
            body = response.data.decode("utf-8")
            if response.status == 200:
                return body
            fields = dict(_ERROR_FIELD.findall(body))
            region = fields.get("Region")
            # AWS names the bucket's region when a request was signed for another one: re-sign.
            if fields.get("Code") == "AuthorizationHeaderMalformed" and region and region != self.region:
                self.region = region
                continue
            break
        raise S3Error(
            response,
            fields.get("Code") or f"HTTP{response.status}",
            _text(fields.get("Message", "")) or body[:200],
            fields.get("Resource"),
            fields.get("RequestId"),
            fields.get("HostId"),
            bucket_name=self.bucket,
        )

    def _request(self, query: dict[str, str]) -> urllib3.BaseHTTPResponse:
        # Sorted and percent-encoded exactly as the signer canonicalises it, so the signature holds.
        query_string = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(query.items()))
        url = urlsplit(f"{self.settings.endpoint_url}/{quote(self.bucket)}?{query_string}")
        now = datetime.now(UTC)
        headers = {
            "Host": self.settings.endpoint,
            "x-amz-content-sha256": _EMPTY_SHA256,
            "x-amz-date": now.strftime("%Y%m%dT%H%M%SZ"),
        }
        headers = sign_v4_s3(
            method="GET", url=url, region=self.region, headers=headers, credentials=self.credentials,
            content_sha256=_EMPTY_SHA256, date=now,
        )
        return self.http.request("GET", url.geturl(), headers=headers, preload_content=True)

    def pages(
        self, prefix: str = "", max_keys: int = S3_MAX_KEYS, delimiter: str = "", start_after: str = ""
    ) -> Iterator[str]:
        """Response bodies of a whole listing, following continuation tokens."""
        token: str | None = None
        while True:
            query = {
                "list-type": "2", "encoding-type": "url", "max-keys": str(max_keys),
                "prefix": prefix, "delimiter": delimiter,
            }
            if token is not None:
                query["continuation-token"] = token
            elif start_after:
                query["start-after"] = start_after
            body = self.get(query)
            truncated, token = _next_token(body)
            yield body
            if not truncated:
                return


_Task = tuple[str, str, int]  # (mode: "expand" | "list", prefix, depth)


class _Stop(Exception):
    """The consumer went away; workers unwind quietly."""


def listing_bodies(
    lister: ListObjectsV2, max_keys: int = S3_MAX_KEYS, workers: int = 1, max_depth: int = 3,
    depth_ahead: int = PREFETCH_PAGES,
) -> Iterator[str]:
    """Every response body of a full recursive listing, fetched by ``workers`` threads ahead of the caller.

    With one worker this is the plain single-stream listing, one page ahead of the parser. With more,
    the bucket is split into shards: a delimiter listing of the root (its pages carry the root's own
    objects, which are kept) discovers prefixes; a prefix is expanded the same way, down to
    ``max_depth``, while its parent had fewer children than workers (so a bucket whose keys all sit
    under ``data/`` still parallelises), and otherwise listed recursively. Every key is in exactly one
    body: either at the level where it has no further delimiter or under one leaf prefix. Socket
    reads release the GIL, so the threads overlap I/O with the caller's parsing.
    """
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    bodies: queue.Queue[object] = queue.Queue(maxsize=max(2, depth_ahead * workers))
    tasks: queue.Queue[_Task | None] = queue.Queue()
    stop = threading.Event()
    lock = threading.Lock()
    outstanding = 1
    done = object()

    def emit(item: object) -> None:
        while True:
            if stop.is_set():
                raise _Stop
            try:
                bodies.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run(task: _Task) -> list[_Task]:
        mode, prefix, depth = task
        if mode == "list":
            for body in lister.pages(prefix=prefix, max_keys=max_keys):
                emit(body)
            return []
        children: list[str] = []
        for body in lister.pages(prefix=prefix, max_keys=max_keys, delimiter="/"):
            children.extend(common_prefixes(body))
            emit(body)  # its <Contents> are the objects directly at this level
        deeper = depth + 1 < max_depth and len(children) < workers
        return [("expand" if deeper else "list", child, depth + 1) for child in children]

    def work() -> None:
        nonlocal outstanding
        while (task := tasks.get()) is not None:
            try:
                follow = run(task)
            except _Stop:
                return
            except BaseException as exc:  # handed to the consumer, which re-raises it
                stop.set()
                try:
                    bodies.put_nowait(exc)
                except queue.Full:
                    failures.append(exc)
                return
            with lock:
                outstanding += len(follow) - 1
                finished = outstanding == 0
            for item in follow:
                tasks.put(item)
            if finished:
                for _ in range(workers):
                    tasks.put(None)
                try:
                    emit(done)
                except _Stop:
                    return

    failures: list[BaseException] = []
    tasks.put(("expand", "", 0) if workers > 1 else ("list", "", 0))
    threads = [threading.Thread(target=work, name=f"listing-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        while True:
            try:
                item = bodies.get(timeout=0.5)
            except queue.Empty:
                if failures:
                    raise failures[0] from None
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        for _ in threads:
            tasks.put(None)
        for thread in threads:
            thread.join(timeout=5)
