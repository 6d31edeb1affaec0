"""The inventory listing writes the same rows minio's list_objects reports, on a real SeaweedFS."""

from __future__ import annotations

import io
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from minio.error import S3Error

from heimdall_storage_pipeline.core.errors import BucketNotFoundError, StorageAccessDeniedError, StorageCleanupError
from heimdall_storage_pipeline.core.list_objects_v2 import ListObjectsV2, listing_batches, parse_page
from heimdall_storage_pipeline.core.listing import list_bucket_to_manifest
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.s3 import S3Settings
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

Row = tuple[str, int, str, datetime]

# Keys that need URL/XML decoding, and keys whose order differs between SeaweedFS's tree order
# and byte order ("a/b" < "a-b" < "a0" in the tree, "a-b" < "a/b" < "a0" in bytes).
ODD_KEYS = [
    "with space", "two  spaces ", "ünïcødé/ß/日本.npy", "plus+sign", "p%2Bq", "100%", "%41", "a&b", "l<t>g",
    "quote\"apos'", "a/b", "a-b", "a0", "a", "a/", "a/b/c/", "tab\there", "q?x#y", "~tilde", "semi;colon",
    "eq=sign", "comma,name", "star*", "back\\slash", "deep/1/2/3/4/5/leaf", "only/one/prefix/x",
]
ONE_PREFIX_KEYS = [f"data/{section}/{i:03d}.npy" for section in ("x", "y", "z") for i in range(40)]
# Enough objects that a 1000-key page cap needs continuation tokens.
BULK_KEYS = [f"bulk-{i % 7}/{i:05d}.bin" for i in range(2_300)]


def put_all(seaweed: SeaweedFS, bucket: str, keys: list[str]) -> None:
    client = seaweed.client()

    def put(index_key: tuple[int, str]) -> None:
        index, key = index_key
        # Sizes differ so that a size mix-up between rows shows.
        body = b"x" * (index % 5)
        client.put_object(bucket, key, io.BytesIO(body), len(body))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, enumerate(keys)))


def minio_rows(seaweed: SeaweedFS, bucket: str) -> set[Row]:
    """What listing.py keeps of minio's listing: objects, not directory markers."""
    return {
        (o.object_name, o.size or 0, (o.etag or "").strip('"'), o.last_modified)
        for o in seaweed.client().list_objects(bucket, recursive=True)
        if not o.is_dir
    }


def manifest_rows(store: ManifestStore, uri: str) -> list[Row]:
    table = store.read_table(uri)
    return list(zip(*(table.column(name).to_pylist() for name in ("key", "size", "etag", "last_modified")),
                    strict=True))


@pytest.fixture(scope="module")
def odd_bucket(seaweed: SeaweedFS) -> str:
    bucket = f"t-fast-{secrets.token_hex(4)}"
    seaweed.client().make_bucket(bucket)
    put_all(seaweed, bucket, ODD_KEYS + ONE_PREFIX_KEYS + BULK_KEYS)
    return bucket


@pytest.mark.parametrize(
    ("max_keys", "workers"),
    [(1000, 1), (1000, 4), (10_000, 1), (10_000, 4), (7, 1), (7, 3)],
    ids=["s3-pages", "s3-pages-sharded", "large-pages", "large-pages-sharded", "tiny-pages", "tiny-sharded"],
)
def test_rows_equal_minio_listing(
    seaweed: SeaweedFS, odd_bucket: str, tmp_path: Path, max_keys: int, workers: int
) -> None:
    store = ManifestStore(str(tmp_path))
    result = list_bucket_to_manifest(
        seaweed.settings(), odd_bucket, store, run_id="fast-test", max_keys=max_keys, workers=workers
    )
    rows = manifest_rows(store, result.manifest_uri)
    expected = minio_rows(seaweed, odd_bucket)
    assert len(rows) == len(set(rows)), "a key was listed twice"
    assert set(rows) == expected
    assert result.object_count == len(expected)
    assert result.total_bytes == sum(size for _, size, _, _ in expected)
    assert result.started_at <= result.listed_at
    # The odd keys survived decoding, and directory markers were skipped as listing.py does.
    keys = {row[0] for row in rows}
    assert {"with space", "plus+sign", "p%2Bq", "100%", "l<t>g", "ünïcødé/ß/日本.npy", "a/b", "a-b"} <= keys
    assert "a/" not in keys


def test_sharded_manifest_equals_the_single_stream_one(seaweed: SeaweedFS, odd_bucket: str, tmp_path: Path) -> None:
    store = ManifestStore(str(tmp_path))
    ours = list_bucket_to_manifest(seaweed.settings(), odd_bucket, store, run_id="sharded", workers=4)
    theirs = list_bucket_to_manifest(seaweed.settings(), odd_bucket, store, run_id="single", workers=1)
    assert store.read_table(ours.manifest_uri).schema == store.read_table(theirs.manifest_uri).schema
    assert set(manifest_rows(store, ours.manifest_uri)) == set(manifest_rows(store, theirs.manifest_uri))
    assert (ours.object_count, ours.total_bytes) == (theirs.object_count, theirs.total_bytes)


def test_single_prefix_bucket_is_split_deeper(seaweed: SeaweedFS, make_bucket: Callable[[str], str]) -> None:
    bucket = make_bucket("fastone")
    put_all(seaweed, bucket, ONE_PREFIX_KEYS)
    lister = ListObjectsV2(seaweed.settings(), bucket)
    pages = list(listing_batches(lister, max_keys=1000, workers=4))
    # root (delimiter) -> data/ (delimiter) -> one recursive listing per section
    assert len(pages) == 5
    keys = [key for page in pages for key in page.column("key").to_pylist()]
    assert sorted(keys) == sorted(ONE_PREFIX_KEYS)


def test_empty_bucket(seaweed: SeaweedFS, make_bucket: Callable[[str], str], tmp_path: Path) -> None:
    bucket = make_bucket("fastempty")
    store = ManifestStore(str(tmp_path))
    for workers in (1, 4):
        result = list_bucket_to_manifest(seaweed.settings(), bucket, store, run_id="e", workers=workers)
        assert (result.object_count, result.total_bytes) == (0, 0)
        assert store.read_table(result.manifest_uri).num_rows == 0


def test_missing_bucket_writes_no_manifest(seaweed: SeaweedFS, tmp_path: Path) -> None:
    store = ManifestStore(str(tmp_path))
    with pytest.raises(BucketNotFoundError, match="does not exist"):
        list_bucket_to_manifest(seaweed.settings(), f"t-missing-{secrets.token_hex(4)}", store, "m")
    assert not list(tmp_path.rglob("*.parquet*"))


def test_denied_credentials(seaweed: SeaweedFS, odd_bucket: str, tmp_path: Path) -> None:
    wrong = seaweed.settings(secret_key="not-the-secret")
    with pytest.raises(StorageAccessDeniedError) as raised:
        list_bucket_to_manifest(wrong, odd_bucket, ManifestStore(str(tmp_path)), "d")
    assert "not-the-secret" not in str(raised.value)
    assert not list(tmp_path.rglob("*.parquet*"))


@pytest.mark.parametrize("workers", [1, 4])
def test_errors_during_listing_reach_the_caller(seaweed: SeaweedFS, odd_bucket: str, workers: int) -> None:
    # The requests themselves (not only the up-front existence check) raise minio's S3Error,
    # which s3_errors turns into the operator errors; from worker threads too.
    wrong = ListObjectsV2(seaweed.settings(secret_key="not-the-secret"), odd_bucket)
    with pytest.raises(S3Error) as denied:
        list(listing_batches(wrong, workers=workers))
    assert denied.value.code == "SignatureDoesNotMatch"
    missing = ListObjectsV2(seaweed.settings(), f"t-missing-{secrets.token_hex(4)}")
    with pytest.raises(S3Error) as not_found:
        list(listing_batches(missing, workers=workers))
    assert not_found.value.code == "NoSuchBucket"


def test_control_characters_and_rewritten_slashes_list_as_minio_does(
    seaweed: SeaweedFS, make_bucket: Callable[[str], str], tmp_path: Path
) -> None:
    # Keys object_store refuses (control characters) or rewrites ('//', trailing '/'), in both shard modes.
    bucket = make_bucket("ctl")
    keys = ["ctl\x01a", "new\nline", "cr\rhere", "del\x7fx", "x//y", "/lead", "%2F", "trail/", "trail"]
    put_all(seaweed, bucket, keys[:-1])
    put_all(seaweed, bucket, keys[-1:])  # after 'trail/': SeaweedFS refuses a directory marker over a file
    store = ManifestStore(str(tmp_path))
    expected = minio_rows(seaweed, bucket)
    assert {"ctl\x01a", "new\nline", "cr\rhere", "del\x7fx", "trail"} <= {row[0] for row in expected}
    for workers in (1, 4):
        result = list_bucket_to_manifest(seaweed.settings(), bucket, store, run_id=f"ctl{workers}", workers=workers)
        rows = manifest_rows(store, result.manifest_uri)
        assert len(rows) == len(set(rows)) and set(rows) == expected


def test_a_server_that_is_not_s3_gets_a_clear_error(tmp_path: Path) -> None:
    # A web server (say, the console's port) answers every request with 200 and HTML.
    class Html(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            page = b"<html><body>console</body></html"
            self.send_response(200)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = S3Settings(endpoint=f"127.0.0.1:{server.server_address[1]}", access_key="a", secret_key="s3cr3t")
        with pytest.raises(StorageCleanupError, match="not a readable ListObjectsV2 response") as raised:
            list_bucket_to_manifest(settings, "bucket", ManifestStore(str(tmp_path)), "h")
        assert "s3cr3t" not in str(raised.value)
        assert not list(tmp_path.rglob("*.parquet*"))
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_server(tmp_path: Path) -> None:
    from heimdall_storage_pipeline.core.errors import StorageUnreachableError
    from heimdall_storage_pipeline.local.seaweedfs import free_ports

    settings = S3Settings(endpoint=f"127.0.0.1:{free_ports(1)[0]}", access_key="a", secret_key="b")
    with pytest.raises(StorageUnreachableError):
        list_bucket_to_manifest(settings, "bucket", ManifestStore(str(tmp_path)), "u")


# --- the parser on bodies shaped like other servers' -------------------------------------------

AWS_PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix></Prefix>
<KeyCount>3</KeyCount><MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
<NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=&amp;x</NextContinuationToken>
<Contents><Key>a+b%2Bc</Key><LastModified>2024-01-02T03:04:05.678Z</LastModified>
<ETag>&quot;0123abcd-2&quot;</ETag><ChecksumAlgorithm>CRC32</ChecksumAlgorithm><Size>42</Size>
<StorageClass>STANDARD</StorageClass></Contents>
<Contents><Key>dir/</Key><LastModified>2024-01-02T03:04:05Z</LastModified><ETag>"e"</ETag><Size>0</Size>
</Contents>
<Contents><Key>%E6%97%A5%26%3C</Key><LastModified>2024-01-02T03:04:05Z</LastModified><ETag>"f"</ETag>
<Size>7</Size></Contents>
<CommonPrefixes><Prefix>sp+ace/</Prefix></CommonPrefixes></ListBucketResult>"""


def test_parse_aws_shaped_page() -> None:
    page = parse_page(AWS_PAGE.encode())
    batch = page.objects
    assert page.next_token == "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=&x"
    assert batch.column("key").to_pylist() == ["a b+c", "日&<"]  # "dir/" is a directory marker
    assert batch.column("size").to_pylist() == [42, 7]
    assert batch.column("etag").to_pylist() == ["0123abcd-2", "f"]
    assert batch.column("last_modified").to_pylist() == [
        datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    ]
    assert page.prefixes == ["sp ace/"]


def test_parse_page_without_url_encoding_and_missing_etag() -> None:
    page = (
        "<ListBucketResult><IsTruncated>false</IsTruncated>"
        "<Contents><Key>a+b &amp; %41</Key><LastModified>2024-01-02T03:04:05.1234567Z</LastModified>"
        "<Size>1</Size></Contents></ListBucketResult>"
    )
    with pytest.raises(ValueError):  # seven fractional digits: minio's parser refuses them too
        parse_page(page.encode())
    parsed = parse_page(page.replace(".1234567Z", "Z").encode())
    assert parsed.next_token is None
    assert parsed.objects.column("key").to_pylist() == ["a+b & %41"]  # not URL-encoded: taken literally
    assert parsed.objects.column("etag").to_pylist() == [""]


def test_truncated_page_without_token_continues_after_its_last_key() -> None:
    page = ("<ListBucketResult><IsTruncated>true</IsTruncated><EncodingType>url</EncodingType><Contents>"
            "<Key>a%2Fb+c</Key><LastModified>2024-01-02T03:04:05Z</LastModified></Contents></ListBucketResult>")
    assert parse_page(page.encode()).next_token == "a/b c"
    with pytest.raises(ValueError, match="no <Key>"):
        parse_page(page.replace("<Key>a%2Fb+c</Key>", "").encode())
