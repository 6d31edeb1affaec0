"""The scan's reference read (ADBC + Arrow) must give exactly what the per-value path gives on
psycopg2's values, which is what the deletion-time re-check runs (real PostgreSQL)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pyarrow as pa
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2.extensions import parse_dsn

from heimdall_storage_pipeline.core.errors import ReferenceDatabaseError
from heimdall_storage_pipeline.core.keys import ReferenceFormat
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy, ReferenceSource
from heimdall_storage_pipeline.core.references import (
    ReferenceCounts,
    adbc_snapshot,
    libpq_uri,
    make_engine,
    normalise_json_array,
    normalise_source_values,
    normalise_string_array,
    read_only_snapshot,
    read_references_to_manifest,
)
from heimdall_storage_pipeline.local.postgres import start_embedded, stop_embedded

BUCKET = "heimdall-raw-iq"
OTHER = "heimdall-audio-chunks"
FORMATS = list(ReferenceFormat)

# Characters that exercise every rule: separators, dots, percent, control chars (NUL included
# for the pure tests), whitespace, quotes and commas, backslashes, unicode.
_ALPHABET = list("ab/.%2F0 \t\n\r\x00\x01\x7f,\"'\\\u00fc\u65e5\U0001f600:sS3-")
_tricky_text = st.text(alphabet=_ALPHABET, max_size=12)
_prefix = st.sampled_from(["", "/", "//", f"s3://{BUCKET}/", f"S3://{BUCKET}//", f"s3://{OTHER}/", "s3://",
                           "s3:///", f"{BUCKET}/", f"/{BUCKET}/", f"{OTHER}/", "http://x/", f"s3://{BUCKET}",
                           f"S3://{BUCKET}/", f"S3://{OTHER}/"])
_suffix = st.sampled_from(["", "/", ".npy", "/..", "/./x", "%20", "%zz", "%FF", "%C3%BC", "//x", " "])
tricky_value = st.builds(lambda p, t, s: p + t + s, _prefix, _tricky_text, _suffix)

FIXED_VALUES = [
    f"s3://{BUCKET}/sessions/a/websdr_1.npy", f"s3://{BUCKET}//lead.npy", f"S3://{BUCKET}/upper.npy",
    f"s3://{OTHER}/x.npy", f"s3://{BUCKET}", f"s3://{BUCKET}/", "s3:///x", f"s3://{BUCKET}/a/../b",
    f"s3://{BUCKET}/a/./b", f"s3://{BUCKET}/a%20b", f"s3://{BUCKET}/a%2F%2Fb", f"s3://{BUCKET}/bad%zz",
    f"{BUCKET}/k.npy", f"/{BUCKET}/k.npy", f"{OTHER}/k.npy", "justabucket", "plain/key.npy", "/lead/key",
    "dbl//slash", " padded key ", "\ttab", "trail ", "ctl\x01x", "del\x7f", ".", "..", "", "ünï/日本.npy",
    'quote"comma,x', "back\\slash", "new\nline", "cr\rx", "\\N", "NULL", "\\.", "a.b/..c/d..", ".hidden/x",
    "a/.hidden", f"s3://{BUCKET}/\u00fc%C3%BC", "%", "x/%", None,
]


def _bucket(*sources: ReferenceSource) -> BucketPolicy:
    return BucketPolicy(name=BUCKET, enabled=True, min_age=timedelta(days=1), batch_size=1000,
                        description="", references=sources)


def _policy(fmt: ReferenceFormat, percent_decode: bool = False, container: str = "none",
            query: str = "SELECT 1") -> tuple[BucketPolicy, ReferenceSource]:
    source = ReferenceSource(name="src", query=query, format=fmt, container=container,
                             percent_decode=percent_decode)
    return _bucket(source), source


def _python(values: list[Any], fmt: ReferenceFormat, percent_decode: bool,
            container: str = "none") -> tuple[list[str], ReferenceCounts]:
    bucket, source = _policy(fmt, percent_decode, container)
    counts = ReferenceCounts()
    return list(normalise_source_values(bucket, source, values, counts)), counts


def _assert_same_strings(values: list[str | None], fmt: ReferenceFormat, percent_decode: bool) -> None:
    bucket, source = _policy(fmt, percent_decode)
    counts = ReferenceCounts()
    keys = normalise_string_array(bucket, source, pa.array(values, pa.string()), counts).to_pylist()
    assert (keys, counts) == _python(values, fmt, percent_decode)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("percent_decode", [False, True])
def test_vectorised_strings_match_the_python_path_on_tricky_values(fmt: ReferenceFormat,
                                                                   percent_decode: bool) -> None:
    _assert_same_strings(FIXED_VALUES, fmt, percent_decode)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(tricky_value, st.none()), max_size=40), fmt=st.sampled_from(FORMATS),
       percent_decode=st.booleans())
def test_vectorised_strings_match_the_python_path(values: list[str | None], fmt: ReferenceFormat,
                                                  percent_decode: bool) -> None:
    _assert_same_strings(values, fmt, percent_decode)


def test_sample_keeps_the_first_ten_in_order_across_fast_and_slow_values() -> None:
    values = [f"s3://{BUCKET}/ok/{i}.npy" if i % 3 else f"bad-{i}" for i in range(60)]
    _assert_same_strings(values, ReferenceFormat.URI, False)


_json_scalar = st.one_of(tricky_value, st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False))
_json_value = st.recursive(_json_scalar, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
_simple_object = st.dictionaries(st.from_regex(r"RX_0[0-9]{2}", fullmatch=True), tricky_value, min_size=1,
                                 max_size=4)
# JSON text as an application may write it: names in any order, repeated, jsonb's separators.
_written_object = st.lists(st.tuples(st.sampled_from(["a", "b", "ab", "RX_000"]), tricky_value), min_size=1,
                           max_size=4)


def _jsonb_text(value: Any) -> str:
    """The text PostgreSQL prints for a jsonb value: ", " and ": ", names by length, then bytes."""
    if isinstance(value, dict):
        names = sorted(value, key=lambda name: (len(name.encode()), name.encode()))
        return "{" + ", ".join(f"{json.dumps(n, ensure_ascii=False)}: {_jsonb_text(value[n])}" for n in names) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_jsonb_text(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _written_text(pairs: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{json.dumps(n, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                           for n, v in pairs) + "}"


def _assert_same_json(texts: list[str], fmt: ReferenceFormat, percent_decode: bool, json_typed: bool) -> None:
    bucket, source = _policy(fmt, percent_decode, "json")
    counts = ReferenceCounts()
    decode = json.loads if json_typed else None
    keys = normalise_json_array(bucket, source, pa.array(texts, pa.string()), counts, decode=decode).to_pylist()
    # psycopg2 hands the per-value path decoded json/jsonb, and text as it is.
    given = [json.loads(text) for text in texts] if json_typed else texts
    assert (keys, counts) == _python(given, fmt, percent_decode, "json")


@settings(max_examples=300, deadline=None)
@given(docs=st.lists(st.one_of(_simple_object, _simple_object, _json_value), max_size=30),
       fmt=st.sampled_from(FORMATS), percent_decode=st.booleans(), json_typed=st.booleans())
def test_vectorised_jsonb_matches_the_python_path(docs: list[Any], fmt: ReferenceFormat,
                                                  percent_decode: bool, json_typed: bool) -> None:
    _assert_same_json([_jsonb_text(doc) for doc in docs], fmt, percent_decode, json_typed)


@settings(max_examples=200, deadline=None)
@given(objects=st.lists(_written_object, max_size=20), fmt=st.sampled_from(FORMATS), json_typed=st.booleans())
def test_vectorised_json_text_with_repeated_or_unordered_names_matches_the_python_path(
    objects: list[list[tuple[str, str]]], fmt: ReferenceFormat, json_typed: bool
) -> None:
    # json and text columns keep what was written: json.loads keeps the last of a repeated name.
    _assert_same_json([_written_text(pairs) for pairs in objects], fmt, False, json_typed)


def test_vectorised_jsonb_mixes_simple_and_other_rows_in_order() -> None:
    docs: list[Any] = [{"RX_000": f"k/{i}.npy", "RX_001": "a/../b"} for i in range(200)]
    docs[5] = [1, "x.npy", None]
    docs[150] = {"RX_000": {"nested": "y"}}
    docs[151] = "a string that is JSON text: [\"z.npy\"]"
    docs[152] = {"b": "first.npy", "a": "second.npy"}  # not in jsonb's order: decoded
    _assert_same_json([_jsonb_text(doc) for doc in docs], ReferenceFormat.KEY, False, True)


# --- the libpq URI ---------------------------------------------------------------------------

PASSWORDS = ["p@ss:w/rd#1%2?x y", "%40%", "a b", "::@@//", "ü€/?#&=+"]


@pytest.mark.parametrize("password", PASSWORDS)
def test_libpq_uri_is_read_back_by_libpq_exactly(password: str) -> None:
    url = sa.engine.URL.create("postgresql+psycopg2", username="re@der:x", password=password, host="db.example",
                               port=6543, database="heim dall/db", query={"sslmode": "require"})
    parsed = parse_dsn(libpq_uri(url))  # libpq's own parser (PQconninfoParse)
    assert parsed == {"user": "re@der:x", "password": password, "host": "db.example", "port": "6543",
                      "dbname": "heim dall/db", "sslmode": "require", "connect_timeout": "10",
                      "client_encoding": "UTF8"}


def test_libpq_uri_keeps_a_socket_directory_and_an_ipv6_host() -> None:
    socket = sa.engine.URL.create("postgresql+psycopg2", username="postgres", database="postgres",
                                  query={"host": "/tmp/pg sockets", "port": "5433", "connect_timeout": "3"})
    assert parse_dsn(libpq_uri(socket)) == {
        "user": "postgres", "dbname": "postgres", "host": "/tmp/pg sockets", "port": "5433",
        "connect_timeout": "3", "client_encoding": "UTF8"}
    ipv6 = sa.make_url("postgresql+psycopg2://u@[::1]:5432/d")
    assert parse_dsn(libpq_uri(ipv6))["host"] == "::1"


# --- against PostgreSQL: the whole read against the per-value path -----------------------------


def _scan(engine: sa.Engine, bucket: BucketPolicy, tmp_path: Path) -> tuple[list[tuple[str, str]], tuple[Any, ...]]:
    store = ManifestStore(str(tmp_path / secrets.token_hex(4)))
    result = read_references_to_manifest(engine, bucket, store, "run-test")
    table = store.read_table(result.manifest_uri)
    rows = list(zip(table.column("key").to_pylist(), table.column("source").to_pylist(), strict=True))
    return rows, (result.referenced_count, result.reference_rows, result.other_bucket_reference_count,
                  result.unparseable_reference_count, result.unparseable_sample)


def _per_value(engine: sa.Engine, bucket: BucketPolicy) -> tuple[list[tuple[str, str]], tuple[Any, ...]]:
    """What the re-check's path makes of the same rows: psycopg2's values, one by one."""
    counts = ReferenceCounts()
    rows: list[tuple[str, str]] = []
    with read_only_snapshot(engine) as connection:
        for source in bucket.references:
            values = [row[0] for row in connection.execute(sa.text(source.query))]
            rows += [(key, source.name) for key in normalise_source_values(bucket, source, values, counts)]
    return rows, (len({key for key, _ in rows}), counts.reference_rows, counts.other_bucket, counts.unparseable,
                  counts.unparseable_sample)


def _scan_matches_per_value(engine: sa.Engine, sources: list[ReferenceSource], tmp_path: Path) -> tuple[Any, ...]:
    bucket = _bucket(*sources)
    scanned = _scan(engine, bucket, tmp_path)
    assert scanned == _per_value(engine, bucket)
    return scanned[1]


def _table(engine: sa.Engine, column_type: str, values: list[Any]) -> str:
    name = f"refs_{secrets.token_hex(4)}"
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE public.{name} (id serial PRIMARY KEY, v {column_type})"))
        connection.execute(sa.text(f"INSERT INTO public.{name} (v) SELECT CAST(unnest(CAST(:values AS text[])) "
                                   f"AS {column_type})"), {"values": values})
    return f"SELECT v FROM public.{name} ORDER BY id"


_DB_VALUES = [value for value in FIXED_VALUES if value is None or "\x00" not in value]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("percent_decode", [False, True])
@pytest.mark.parametrize("column_type", ["text", "varchar(80)", "char(40)"])
def test_read_matches_the_per_value_path_for_string_columns(
    db_engine: sa.Engine, tmp_path: Path, fmt: ReferenceFormat, percent_decode: bool, column_type: str,
) -> None:
    query = _table(db_engine, column_type, _DB_VALUES)
    source = ReferenceSource(name="s", query=query, format=fmt, percent_decode=percent_decode)
    _scan_matches_per_value(db_engine, [source], tmp_path)


def test_many_batches_of_plain_values_keep_every_key(db_engine: sa.Engine, tmp_path: Path) -> None:
    # Enough rows for several ADBC batches, all plain, then odd values at the end.
    query = (f"SELECT 's3://{BUCKET}/sessions/' || g || '/websdr_' || (g % 7) || '.npy' "
             f"FROM generate_series(1, 300000) AS g UNION ALL SELECT 's3://{BUCKET}//odd.npy' "
             f"UNION ALL SELECT 's3://{BUCKET}/sessions/1/websdr_1.npy'")
    source = ReferenceSource(name="s", query=query, format=ReferenceFormat.URI)
    figures = _scan_matches_per_value(db_engine, [source], tmp_path)
    assert figures[:4] == (300_001, 300_002, 0, 0)


def test_read_matches_the_per_value_path_for_json_columns(db_engine: sa.Engine, tmp_path: Path) -> None:
    docs: list[Any] = [{"RX_000": f"k/{i}.npy", "RX_001": f"s3://{BUCKET}/x"} for i in range(100)]
    docs += [[1, "a.npy", None, {"n": "b"}], "c.npy", '["d.npy"]', {}, [], {"RX": None}, 3.5, True,
             {"ü": "日本/ü.npy", "q": 'quo"te', "t": "tab\t", "b": "back\\slash"}, None]
    json_texts = [None if doc is None else json.dumps(doc) for doc in docs]
    written = ['{"b": "x.npy", "a": "y.npy"}', '{"a": "1.npy", "a": "2.npy"}', '{"a":"z.npy"}']
    sources = [
        ReferenceSource(name="jsonb", query=_table(db_engine, "jsonb", json_texts), container="json"),
        ReferenceSource(name="json", query=_table(db_engine, "json", [*json_texts, *written]), container="json"),
        ReferenceSource(name="text", query=_table(db_engine, "text", [*json_texts, *written, "not json", ""]),
                        container="json"),
    ]
    figures = _scan_matches_per_value(db_engine, sources, tmp_path)
    assert figures[3] > 0  # the odd values really were unparseable


def test_other_column_types_match_the_per_value_path(db_engine: sa.Engine, tmp_path: Path) -> None:
    sources = [ReferenceSource(name="int", query="SELECT g FROM generate_series(1, 3) AS g"),
               ReferenceSource(name="jsonb-none", query="SELECT '{\"a\": \"b\"}'::jsonb UNION ALL "
                                                        "SELECT '\"c.npy\"'::jsonb"),
               ReferenceSource(name="two-columns", query="SELECT 'k.npy' AS v, 1 AS heimdall_ref_0"),
               ReferenceSource(name="empty", query="SELECT 'x'::text WHERE false"),
               ReferenceSource(name="array", query="SELECT ARRAY['e.npy', 'f.npy', NULL]", container="json"),
               ReferenceSource(name="uuid", query="SELECT '0b5e6c2e-8a4b-4d44-9c1e-2f8d5c7a9b10'::uuid")]
    figures = _scan_matches_per_value(db_engine, sources, tmp_path)
    # k, c, e and f; the 3 ints, one jsonb object and the UUID (not a string for psycopg2 either) unparseable
    assert figures[:4] == (4, 9, 0, 5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(tricky_value.filter(lambda v: "\x00" not in v), st.none()), max_size=30),
       fmt=st.sampled_from(FORMATS), percent_decode=st.booleans())
def test_read_matches_the_per_value_path_on_generated_values(
    db_engine: sa.Engine, tmp_path: Path, values: list[str | None], fmt: ReferenceFormat, percent_decode: bool,
) -> None:
    source = ReferenceSource(name="s", query=_table(db_engine, "text", values), format=fmt,
                             percent_decode=percent_decode)
    _scan_matches_per_value(db_engine, [source], tmp_path)


# --- the snapshot ------------------------------------------------------------------------------


def test_the_read_runs_in_a_read_only_repeatable_read_transaction(db_engine: sa.Engine) -> None:
    with adbc_snapshot(db_engine) as cursor:
        cursor.execute("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')")
        assert cursor.fetchall() == [("repeatable read", "on")]


@dataclass(frozen=True)
class _InsertingStore(ManifestStore):
    """A store that, when the read asks for its manifest's name, has another connection insert a row."""

    url: str = ""

    def new_uri(self, kind: str, bucket: str, at: datetime, run_id: str) -> str:
        engine = sa.create_engine(self.url)
        with engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO public.refs_snapshot (v) VALUES ('late.npy')"))
        engine.dispose()
        return super().new_uri(kind, bucket, at, run_id)


def test_every_source_reads_the_snapshot_taken_when_the_read_began(
    db_engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE public.refs_snapshot (v text)"))
        connection.execute(sa.text("INSERT INTO public.refs_snapshot (v) VALUES ('early.npy')"))
    query = "SELECT v FROM public.refs_snapshot"
    bucket = _bucket(ReferenceSource(name="first", query=query), ReferenceSource(name="second", query=query))
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def clock() -> datetime:  # read just before the snapshot is taken: this row is in it
        with db_engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO public.refs_snapshot (v) VALUES ('before.npy')"))
        return at

    store = _InsertingStore(root=str(tmp_path), url=database_url)
    result = read_references_to_manifest(db_engine, bucket, store, "run-snapshot", clock=clock)
    rows = store.read_table(result.manifest_uri).to_pylist()
    assert sorted((row["source"], row["key"]) for row in rows) == [
        ("first", "before.npy"), ("first", "early.npy"), ("second", "before.npy"), ("second", "early.npy")]
    assert result.snapshot_at == at
    with db_engine.connect() as connection:  # the late row was committed all the same
        assert connection.execute(sa.text("SELECT count(*) FROM public.refs_snapshot")).scalar_one() == 3


# --- errors ----------------------------------------------------------------------------------


def _fails(engine: sa.Engine, source: ReferenceSource, tmp_path: Path) -> str:
    store = ManifestStore(str(tmp_path / "store"))
    with pytest.raises(ReferenceDatabaseError) as raised:
        read_references_to_manifest(engine, _bucket(source), store, "run")
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message
    assert f"bucket {BUCKET!r}, source {source.name!r}" in message
    assert not list((tmp_path / "store").rglob("*.parquet*"))  # no manifest, not even a partial one
    return message


def test_a_missing_table_fails_clearly(db_engine: sa.Engine, tmp_path: Path) -> None:
    bucket, _ = _policy(ReferenceFormat.KEY, query="SELECT v FROM public.no_such_table")
    with pytest.raises(ReferenceDatabaseError, match=r"a reference query failed on .*no_such_table"):
        read_references_to_manifest(db_engine, bucket, ManifestStore(str(tmp_path)), "run")


def test_a_query_past_its_statement_timeout_fails_with_the_fix(db_engine: sa.Engine, tmp_path: Path) -> None:
    source = ReferenceSource(name="slow", query="SELECT 'k.npy' || pg_sleep(5)::text",
                             statement_timeout=timedelta(seconds=1))
    message = _fails(db_engine, source, tmp_path)
    assert "canceling statement due to statement timeout" in message
    assert "raise statement_timeout" in message and "index the column" in message


def test_a_timeout_after_rows_have_arrived_fails_the_same_way(db_engine: sa.Engine, tmp_path: Path) -> None:
    query = ("SELECT repeat('x', 100) || g || CASE WHEN g = 250000 THEN pg_sleep(5)::text ELSE '' END "
             "FROM generate_series(1, 300000) AS g")
    source = ReferenceSource(name="stalls", query=query, statement_timeout=timedelta(seconds=1))
    message = _fails(db_engine, source, tmp_path)
    assert "statement timeout" in message and "raise statement_timeout" in message


def test_an_error_half_way_through_the_rows_fails_clearly(db_engine: sa.Engine, tmp_path: Path) -> None:
    query = "SELECT 'k' || (1 / (250000 - g))::text FROM generate_series(1, 300000) AS g"
    message = _fails(db_engine, ReferenceSource(name="s", query=query), tmp_path)
    assert "division by zero" in message and "fix the query" in message


@pytest.mark.parametrize(("query", "expected"), [
    ("SELECT v FROM t WHERE", "syntax error"),
    ("SELECT nextval('public.refs_sequence')::text", "cannot execute nextval() in a read-only transaction"),
    ("SELECT '12.5'::numeric", "select it as text in the query"),
])
def test_other_database_errors_fail_in_one_line(db_engine: sa.Engine, tmp_path: Path, query: str,
                                                expected: str) -> None:
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE SEQUENCE IF NOT EXISTS public.refs_sequence"))
    assert expected in _fails(db_engine, ReferenceSource(name="s", query=query), tmp_path)


def test_a_table_the_reader_may_not_read_fails_with_the_grant_to_make(
    db_engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    role = f"refs_reader_{secrets.token_hex(4)}"
    with db_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE public.refs_private (v text)"))
        connection.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
    reader = make_engine(sa.make_url(database_url).set(username=role).render_as_string(hide_password=False))
    try:
        message = _fails(reader, ReferenceSource(name="s", query="SELECT v FROM public.refs_private"), tmp_path)
    finally:
        reader.dispose()
        with db_engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE public.refs_private"))
            connection.execute(sa.text(f"DROP ROLE {role}"))
    assert "permission denied" in message and "GRANT SELECT" in message


def test_an_unreachable_database_fails_without_the_password(tmp_path: Path) -> None:
    password = "p@ss:w/rd#%?x y-" + secrets.token_hex(4)
    url = sa.engine.URL.create("postgresql+psycopg2", username="heimdall", password=password, host="127.0.0.1",
                               port=1, database="heimdall")
    engine = make_engine(url.render_as_string(hide_password=False))
    bucket, _ = _policy(ReferenceFormat.KEY, query="SELECT 'a'")
    with pytest.raises(ReferenceDatabaseError) as raised:
        read_references_to_manifest(engine, bucket, ManifestStore(str(tmp_path)), "run")
    message = str(raised.value)
    assert message.startswith("cannot read the reference database at postgresql+psycopg2://heimdall:***@127.0.0.1:1/")
    assert "HEIMDALL_DATABASE_URL" in message
    for secret in (password, password.replace("%", "%25"), "p@ss", "w/rd"):
        assert secret not in message


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """An embedded PostgreSQL that asks role ``reader`` for its password (scram-sha-256):
    the admin URL and the reader's password, which holds every character a URL gives a meaning."""
    data = tmp_path_factory.mktemp("password-pg") / "data"
    admin_url = start_embedded(data)
    password = PASSWORDS[0] + secrets.token_hex(4)
    admin = sa.create_engine(admin_url)
    with admin.begin() as connection:
        literal = "'" + password.replace("'", "''") + "'"
        connection.execute(sa.text(f"CREATE ROLE reader LOGIN PASSWORD {literal}"))
        connection.execute(sa.text("CREATE TABLE public.refs (v text); GRANT SELECT ON public.refs TO reader; "
                                   "INSERT INTO public.refs VALUES ('k/1.npy'), ('k/2.npy')"))
    hba = data / "pg_hba.conf"
    hba.write_text("local all reader scram-sha-256\n" + hba.read_text())
    with admin.begin() as connection:
        connection.execute(sa.text("SELECT pg_reload_conf()"))
    admin.dispose()
    yield admin_url, password
    stop_embedded(data)


@pytest.mark.parametrize("spelling", ["percent-encoded", "as is"])
def test_a_password_with_url_characters_logs_in(password_server: tuple[str, str], tmp_path: Path,
                                                spelling: str) -> None:
    admin_url, password = password_server
    socket = urlencode(sa.make_url(admin_url).query)
    written = quote(password, safe="") if spelling == "percent-encoded" else password
    engine = make_engine(f"postgresql+psycopg2://reader:{written}@/postgres?{socket}")
    bucket, _ = _policy(ReferenceFormat.KEY, query="SELECT v FROM public.refs")
    result = read_references_to_manifest(engine, bucket, ManifestStore(str(tmp_path)), "run")
    assert (result.referenced_count, result.reference_rows) == (2, 2)

    wrong = make_engine(f"postgresql+psycopg2://reader:{quote(password + '-wrong', safe='')}@/postgres?{socket}")
    with pytest.raises(ReferenceDatabaseError) as raised:
        read_references_to_manifest(wrong, bucket, ManifestStore(str(tmp_path)), "run")
    message = str(raised.value)
    assert "password authentication failed" in message and "HEIMDALL_DATABASE_URL" in message
    assert password not in message and "p@ss" not in message and "\n" not in message
