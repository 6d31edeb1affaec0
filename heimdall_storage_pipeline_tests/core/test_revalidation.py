"""The narrowed re-check must find every reference the full scan would find (real PostgreSQL)."""

from __future__ import annotations

import contextlib
import json
import secrets
from datetime import timedelta

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core.keys import InvalidKeyError, ReferenceFormat, normalize_key
from heimdall_storage_pipeline.core.policy import BucketPolicy, ReferenceSource
from heimdall_storage_pipeline.core.references import (
    ReferenceCounts,
    normalise_source_values,
    read_only_snapshot,
)
from heimdall_storage_pipeline.core.revalidation import narrowed_query, referenced_among

BUCKET = "heimdall-test"
segment = st.text(
    alphabet=list("abcXYZ019-_.+%&=' \"\\ü€日"), min_size=1, max_size=6
).filter(lambda s: s not in (".", ".."))
key_strategy = st.lists(segment, min_size=1, max_size=4).map("/".join)


def _spell(key: str, style: str) -> tuple[str, ReferenceFormat]:
    return {
        "bare": (key, ReferenceFormat.KEY),
        "slashes": ("/" + key.replace("/", "//"), ReferenceFormat.KEY),
        "padded": (f"  {key}\t", ReferenceFormat.KEY),
        "trailing": (key + "/", ReferenceFormat.KEY),
        "uri": (f"s3://{BUCKET}/{key}", ReferenceFormat.URI),
        "bucket_key": (f"{BUCKET}/{key}", ReferenceFormat.BUCKET_KEY),
    }[style]


def _policy(table: str, fmt: ReferenceFormat, container: str) -> BucketPolicy:
    column = "doc" if container == "json" else "value"
    return BucketPolicy(
        name=BUCKET, enabled=True, min_age=timedelta(days=1), batch_size=1000, description="",
        references=(ReferenceSource(name="s", query=f"SELECT {column} FROM {table}", format=fmt,
                                    container=container),),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.lists(key_strategy, min_size=1, max_size=6, unique=True),
    style=st.sampled_from(["bare", "slashes", "padded", "trailing", "uri", "bucket_key"]),
    container=st.sampled_from(["none", "json"]),
    as_array=st.booleans(),
    data=st.data(),
)
def test_narrowed_recheck_finds_exactly_what_a_full_read_finds(db_engine, keys, style, container, as_array,
                                                              data):
    table = f"refs_{secrets.token_hex(4)}"
    spelled = [_spell(k, style) for k in keys]
    fmt = spelled[0][1]
    with db_engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE {table} (value text, doc jsonb)"))
        for value, _ in spelled:
            doc = json.dumps([value] if as_array else {"RX_001": value, "RX_002": "other/x.npy"})
            connection.execute(sa.text(f"INSERT INTO {table} VALUES (:v, CAST(:d AS jsonb))"),
                               {"v": value, "d": doc})
    policy = _policy(table, fmt, container)
    normalisable = set()
    for key in keys:
        with contextlib.suppress(InvalidKeyError):
            normalisable.add(normalize_key(key))
    # Ask for every key that exists plus some that do not.
    asked = normalisable | {f"absent/{k}" for k in data.draw(st.lists(segment, max_size=3))}
    with read_only_snapshot(db_engine) as connection:
        found = referenced_among(connection, policy, asked)
        full = set(normalise_source_values(
            policy, policy.references[0], (row[0] for row in connection.execute(
                sa.text(policy.references[0].query))), ReferenceCounts(),
        ))
    assert found == full & asked


def test_narrowing_is_skipped_where_it_could_miss_a_spelling():
    plain = ReferenceSource(name="s", query="SELECT v FROM t", format=ReferenceFormat.KEY)
    decoded = ReferenceSource(name="s", query="SELECT v FROM t", format=ReferenceFormat.URI,
                              percent_decode=True)
    json_source = ReferenceSource(name="s", query="SELECT v FROM t", container="json")
    assert "ANY(:segments)" in narrowed_query(plain, {"a b.npy"})[0]
    assert narrowed_query(decoded, {"x.npy"}) == ("SELECT v FROM t", {})
    assert "ANY(:segments)" in narrowed_query(json_source, {"x.npy"})[0]
    assert narrowed_query(json_source, {'we"ird.npy'}) == ("SELECT v FROM t", {})
    assert narrowed_query(json_source, {"ünï.npy"}) == ("SELECT v FROM t", {})


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
