"""The narrowed re-check must find every reference the full scan would find (real PostgreSQL)."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core.keys import ReferenceFormat, canonical_prefix
from heimdall_storage_pipeline.core.policy import BucketPolicy, ReferenceSource
from heimdall_storage_pipeline.core.references import (
    ReferenceCounts,
    normalise_source_values,
    read_only_snapshot,
)
from heimdall_storage_pipeline.core.revalidation import (
    BPCHAR_OID,
    JSONB_OID,
    TEXT_OIDS,
    describe_query,
    narrowed_query,
    referenced_among,
    unusual_spelling_sql,
)

# Bucket names that are prefixes of each other and hold LIKE's special characters.
BUCKETS = ["b", "bb", "b%", "b_", "b\\", "heimdall-test"]
segment = st.text(
    alphabet=list("abcXYZ019-_.+%&=' \"\\ü€日"), min_size=1, max_size=6
).filter(lambda s: s not in (".", ".."))
key_strategy = st.lists(segment, min_size=1, max_size=4).map("/".join)
# Container and type of the first column; char(80) pads every value with spaces.
CASES = [("none", "text"), ("none", "varchar(300)"), ("none", "char(80)"),
         ("json", "jsonb"), ("json", "json"), ("json", "text")]


@st.composite
def spellings(draw: st.DrawFn, key: str, bucket: str, fmt: ReferenceFormat) -> str:
    """One stored value that may (or may almost) name ``key``: every spelling normalisation accepts.

    The first choice of each draw is the plain one (hypothesis favours it), the others the
    unusual ones, a foreign bucket or a value in another format.
    """
    slashes = st.sampled_from(["/", "//", "///"])
    body = "".join(draw(slashes) if c == "/" else c for c in key)  # runs of '/' inside the key
    body = draw(st.sampled_from(["", "/", "//"])) + body  # leading '/' of the key part
    body += draw(st.sampled_from(["", " ", "  ", "/"]))  # trailing spaces or '/': another key
    named = draw(st.sampled_from([bucket, *BUCKETS, bucket + "b", bucket[:-1] or "x"]))
    style = draw(st.sampled_from([fmt.value, "key", "uri", "bucket_key"]))
    if style == "uri":
        return draw(st.sampled_from(["s3://", "S3://", "s3:/", "S3:"])) + named + "/" + body
    if style == "bucket_key":
        return draw(st.sampled_from(["", "/", "//"])) + named + "/" + body
    return body


def _json_text(document: object, escape_slashes: bool, ensure_ascii: bool) -> str:
    text = json.dumps(document, ensure_ascii=ensure_ascii)
    return text.replace("/", "\\/") if escape_slashes else text  # '\/' is a valid escape of '/'


@st.composite
def documents(draw: st.DrawFn, values: list[str | None]) -> list[object]:
    """JSON container values holding ``values``: objects, arrays, bare strings, nested junk."""
    docs: list[object] = []
    for value in values:
        shape = draw(st.sampled_from(["object", "object", "array", "string", "nested", "double"]))
        if shape == "double":  # JSON text inside a JSON string: psycopg2 hands it to json.loads again
            docs.append(json.dumps(draw(st.sampled_from([{"RX_001": value}, [value], value]))))
        elif shape == "object":
            docs.append({"RX_001": value, "RX_002": "other/x.npy", "n": 1})
        elif shape == "array":
            docs.append([value, "other/y.npy", None])
        elif shape == "string":
            docs.append(value)
        else:  # a nested value is no key (Python yields the dict), but must not break the SQL
            docs.append({"o": {"k": value}, "l": [value]})
    return docs


def _store(values: list[str | None], container: str, column_type: str, data: st.DataObject) -> list[str | None]:
    """The column values holding ``values``: as they are, or inside JSON documents of every shape."""
    if container == "none":
        return values
    docs = data.draw(documents(values))
    if column_type == "jsonb":
        return [json.dumps(doc) for doc in docs]
    return [_json_text(doc, data.draw(st.booleans()), data.draw(st.booleans())) for doc in docs]


def _table(engine: sa.Engine, column_type: str, stored: list[str | None]) -> str:
    table = f"refs_{secrets.token_hex(4)}"
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE {table} (id serial, value {column_type})"))
        for value in stored:
            connection.execute(sa.text(f"INSERT INTO {table} (value) VALUES (:v)"), {"v": value})
    return table


def _policy(bucket: str, query: str, fmt: ReferenceFormat, container: str) -> BucketPolicy:
    return BucketPolicy(
        name=bucket, enabled=True, min_age=timedelta(days=1), batch_size=1000, description="",
        references=(ReferenceSource(name="s", query=query, format=fmt, container=container),),
    )


def _full_read(connection: sa.Connection, policy: BucketPolicy) -> set[str]:
    source = policy.references[0]
    rows = connection.execute(sa.text(source.query))
    return set(normalise_source_values(policy, source, (row[0] for row in rows), ReferenceCounts()))


@pytest.mark.parametrize(("container", "column_type"), CASES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bucket=st.sampled_from(BUCKETS),
    keys=st.lists(key_strategy, min_size=1, max_size=8, unique=True),
    fmt=st.sampled_from(list(ReferenceFormat)),
    data=st.data(),
)
def test_narrowed_recheck_finds_exactly_what_a_full_read_finds(db_engine, container, column_type, bucket, keys, fmt,
                                                              data):
    # Mostly one spelling per key, so that no canonical twin finds the key for an unusual one.
    values: list[str | None] = []
    for key in keys:
        values += [data.draw(spellings(key, bucket, fmt)) for _ in range(data.draw(st.sampled_from([1, 1, 1, 2])))]
    values.append(None)
    table = _table(db_engine, column_type, _store(values, container, column_type, data))
    policy = _policy(bucket, f"SELECT value FROM {table} ORDER BY id", fmt, container)
    with read_only_snapshot(db_engine) as connection:
        full = _full_read(connection, policy)
        # Ask for some of what the full read finds (a miss shows) and keys nobody names; then
        # also for keys the values almost spell (whose rows must not be what finds the rest).
        asked: set[str] = set()
        if full:
            asked = set(data.draw(st.lists(st.sampled_from(sorted(full)), min_size=1, unique=True), label="asked"))
        asked |= {f"absent/{k}" for k in data.draw(st.lists(segment, max_size=3))}
        also = asked | {key for key in keys if data.draw(st.booleans())}
        found = referenced_among(connection, policy, asked)
        found_also = referenced_among(connection, policy, also)
        described = describe_query(connection, policy.references[0].query)
    assert found == full & asked
    assert found_also == full & also
    assert "WHERE" in narrowed_query(policy.references[0], bucket, {"x"}, *described)[0]  # none read whole


# Every way a key can be spelled, each for its own key so that no other row finds it: {b} is
# the bucket, {0}/{1}/{2} the key's segments.
SPELLINGS = {
    ReferenceFormat.URI: ["s3://{b}/{0}/{1}/{2}", "S3://{b}/{0}/{1}/{2}", "s3://{b}//{0}/{1}/{2}",
                          "s3://{b}/{0}//{1}/{2}", "s3://{b}/{0}/{1}///{2}", "S3://{b}///{0}//{1}/{2}"],
    ReferenceFormat.BUCKET_KEY: ["{b}/{0}/{1}/{2}", "/{b}/{0}/{1}/{2}", "//{b}/{0}/{1}/{2}", "{b}//{0}/{1}/{2}",
                                 "{b}/{0}//{1}/{2}", "/{b}//{0}///{1}/{2}"],
    ReferenceFormat.KEY: ["{0}/{1}/{2}", "/{0}/{1}/{2}", "//{0}/{1}/{2}", "{0}//{1}/{2}", "{0}/{1}///{2}",
                          "///{0}//{1}//{2}"],
}
# Values that name no key of the bucket: other buckets (one a prefix of it), other formats.
DISTRACTORS = ["s3://{b}x/{0}/{1}/{2}", "s3://{p}/{0}/{1}/{2}", "{b}x/{0}/{1}/{2}", "{p}/{0}/{1}/{2}",
               "s3:/{b}/{0}/{1}/{2}", "{0}/./{1}/{2}"]


@pytest.mark.parametrize("fmt", list(ReferenceFormat))
@pytest.mark.parametrize(("container", "column_type"), CASES)
def test_every_spelling_of_every_key_is_found(db_engine, fmt, container, column_type):
    """Deterministic: each unusual spelling is the only row naming its key, in every column type."""
    bucket = "b_%\\x"
    middles = ["a%b", "_", "c\\d", "ü €", 'q"t']
    values: list[str | None] = []
    expected: set[str] = set()
    for number, template in enumerate(SPELLINGS[fmt] + DISTRACTORS):
        for middle in middles:
            for last in ("websdr_1.npy", "x.npy "):
                values.append(template.format(f"v{number}", middle, last, b=bucket, p=bucket[:-1]))
                expected |= {f"v{number}/{middle}/{last}"} if number < len(SPELLINGS[fmt]) else set()

    # Objects and arrays; a bare JSON string only as text: psycopg2 decodes json and jsonb
    # strings to str, which the normalisation then reads as JSON text (so they name nothing).
    shapes = [lambda v: {"RX_000": v, "n": 1}, lambda v: [v, {"k": v}], lambda v: v]
    shapes = shapes if column_type == "text" else shapes[:2]
    docs = [shapes[index % len(shapes)](value) for index, value in enumerate(values)]
    # JSON text as written, plain and with every '/' and non-ASCII character escaped.
    variants = ([values] if container == "none" else [[json.dumps(doc) for doc in docs]] if column_type == "jsonb"
                else [[_json_text(doc, escaped, escaped) for doc in docs] for escaped in (False, True)])
    for stored in variants:
        table = _table(db_engine, column_type, list(stored))
        policy = _policy(bucket, f"SELECT value FROM {table}", fmt, container)
        with read_only_snapshot(db_engine) as connection:
            full = _full_read(connection, policy)
            found = referenced_among(connection, policy, full | {"absent/x.npy"})
        # Every spelling names its own key (char(n) pads them all).
        assert {key.rstrip(" ") for key in expected} <= {key.rstrip(" ") for key in full}
        assert found == full


def test_narrowing_is_skipped_where_it_could_miss_a_spelling():
    plain = ReferenceSource(name="s", query="SELECT v FROM t", format=ReferenceFormat.KEY)
    decoded = ReferenceSource(name="s", query="SELECT v FROM t", format=ReferenceFormat.URI, percent_decode=True)
    json_source = ReferenceSource(name="s", query="SELECT v FROM t", container="json")
    text_oid = next(iter(TEXT_OIDS))
    assert ":spellings" in narrowed_query(plain, "b", {"a b.npy"}, text_oid)[0]
    assert narrowed_query(decoded, "b", {"x.npy"}, text_oid) == ("SELECT v FROM t", {})
    assert narrowed_query(plain, "b", {"x.npy"}, None) == ("SELECT v FROM t", {})
    assert narrowed_query(plain, "b", {"x.npy"}, 1009) == ("SELECT v FROM t", {})  # text[]: read whole
    assert narrowed_query(plain, "b", {"x.npy"}, JSONB_OID) == ("SELECT v FROM t", {})
    # Keys that JSON must escape are narrowed too now: escaped rows are always read.
    assert ":spellings" in narrowed_query(json_source, "b", {'we"ird\\.npy'}, JSONB_OID)[0]
    assert ":spellings" in narrowed_query(json_source, "b", {"ünï.npy"}, text_oid)[0]
    uri = ReferenceSource(name="s", query="SELECT v FROM t", format=ReferenceFormat.URI)
    assert narrowed_query(uri, "b\n", {"x.npy"}, text_oid) == ("SELECT v FROM t", {})  # no such bucket
    # char(n)::text drops the padding that psycopg2 keeps: compare both spellings.
    assert narrowed_query(plain, "b", {"k "}, BPCHAR_OID)[1] == {"spellings": "k\nk "}


@pytest.mark.parametrize("column_type", ["text", "varchar(300)", "char(20)", "uuid", "text[]", "jsonb"])
def test_other_column_types_and_awkward_queries_are_still_right(db_engine, column_type):
    """Types the narrowing does not cover are read whole; duplicate column names and comments work."""
    table = f"refs_{secrets.token_hex(4)}"
    value = {"uuid": "0b7e4bba-5f7f-4f45-9a4e-3c4c10e1c1a5", "text[]": "{a/b.npy,c.npy}", "jsonb": '"a/b.npy"'}.get(
        column_type, "a/b.npy")
    with db_engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE {table} (value {column_type}, other text)"))
        connection.execute(sa.text(f"INSERT INTO {table} VALUES (CAST(:v AS {column_type}), 'x')"), {"v": value})
    query = f"SELECT value, other AS value, 1 AS heimdall_ref FROM {table} -- a trailing comment"
    policy = _policy("b", query, ReferenceFormat.KEY, "none")
    with read_only_snapshot(db_engine) as connection:
        full = _full_read(connection, policy)
        for asked in (full | {"absent"}, full | {"a/b.npy", "c.npy", "absent"}):
            assert referenced_among(connection, policy, asked) == full & asked


@pytest.mark.parametrize("fmt", list(ReferenceFormat))
def test_btree_and_partial_index_answer_the_recheck_without_a_table_scan(db_engine, fmt):
    """The operators' recipe in docs/performance.md: both arms of the query use an index."""
    table = f"refs_{secrets.token_hex(4)}"
    with db_engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE {table} (id serial, location varchar(512))"))
        connection.execute(sa.text(
            f"INSERT INTO {table} (location) SELECT :prefix || 'k/' || g FROM generate_series(1, 5000) g"),
            {"prefix": canonical_prefix("b", fmt)})
        connection.execute(sa.text(f"CREATE INDEX {table}_exact ON {table} (location)"))
        connection.execute(sa.text(
            f"CREATE INDEX {table}_unusual ON {table} (location) WHERE {unusual_spelling_sql(fmt, 'location')}"))
        connection.execute(sa.text(f"ANALYZE {table}"))
    source = ReferenceSource(name="s", query=f"SELECT location FROM {table} WHERE location IS NOT NULL", format=fmt)
    with db_engine.begin() as connection:
        connection.execute(sa.text("SET LOCAL enable_seqscan = off"))  # the plan it can take, not the one it picks
        sql, params = narrowed_query(source, "b", {"k/1", "k/2"}, *describe_query(connection, source.query))
        plan = "\n".join(row[0] for row in connection.execute(sa.text(f"EXPLAIN {sql}"), params))
    assert "Seq Scan" not in plan
    assert f"{table}_exact" in plan and f"{table}_unusual" in plan, plan


def test_listed_stats_equal_head_stats_and_only_head_reports_a_missing_object(seaweed, make_bucket):
    import io

    from heimdall_storage_pipeline.core.list_objects_v2 import ListObjectsV2
    from heimdall_storage_pipeline.core.revalidation import stat_objects

    bucket = make_bucket("stat")
    client = seaweed.client()
    keys = [f"d/{i:03d}.npy" for i in range(30)] + ["d/with space", "d/ünï", "d/a-b", "d/a/b", "d/a0", "e/x+y%z"]
    for key in keys:
        client.put_object(bucket, key, io.BytesIO(key.encode()), len(key.encode()))
    asked = [*keys, "d/never-uploaded.npy"]
    listed = stat_objects(client, bucket, asked, ListObjectsV2(seaweed.settings(), bucket))
    headed = stat_objects(client, bucket, asked)  # no lister: HEAD for every key
    assert listed == headed
    assert listed["d/never-uploaded.npy"] is None
    assert all(listed[k] is not None and listed[k].size == len(k.encode()) for k in keys)
