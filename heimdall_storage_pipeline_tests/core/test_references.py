"""The fast reference path (COPY + Arrow) must give exactly what the per-value Python path gives."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core import native, references
from heimdall_storage_pipeline.core.errors import ReferenceDatabaseError
from heimdall_storage_pipeline.core.keys import ReferenceFormat
from heimdall_storage_pipeline.core.manifests import ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy, ReferenceSource
from heimdall_storage_pipeline.core.references import (
    ReferenceCounts,
    normalise_jsonb_array,
    normalise_source_values,
    normalise_string_array,
    read_references_to_manifest,
)

BUCKET = "heimdall-raw-iq"
OTHER = "heimdall-audio-chunks"
FORMATS = list(ReferenceFormat)

# Characters that exercise every rule: separators, dots, percent, control chars (NUL included
# for the pure tests), whitespace, quotes and commas (CSV), backslashes (COPY text), unicode.
_ALPHABET = list("ab/.%2F0 \t\n\r\x00\x01\x7f,\"'\\\u00fc\u65e5\U0001f600:sS3-")
_tricky_text = st.text(alphabet=_ALPHABET, max_size=12)
_prefix = st.sampled_from(["", "/", "//", f"s3://{BUCKET}/", f"S3://{BUCKET}//", f"s3://{OTHER}/", "s3://",
                           "s3:///", f"{BUCKET}/", f"/{BUCKET}/", f"{OTHER}/", "http://x/", f"s3://{BUCKET}"])
_suffix = st.sampled_from(["", "/", ".npy", "/..", "/./x", "%20", "%zz", "%FF", "%C3%BC", "//x", " "])
tricky_value = st.builds(lambda p, t, s: p + t + s, _prefix, _tricky_text, _suffix)

FIXED_VALUES = [
    f"s3://{BUCKET}/sessions/a/websdr_1.npy", f"s3://{BUCKET}//lead.npy", f"S3://{BUCKET}/upper.npy",
    f"s3://{OTHER}/x.npy", f"s3://{BUCKET}", f"s3://{BUCKET}/", "s3:///x", f"s3://{BUCKET}/a/../b",
    f"s3://{BUCKET}/a/./b", f"s3://{BUCKET}/a%20b", f"s3://{BUCKET}/a%2F%2Fb", f"s3://{BUCKET}/bad%zz",
    f"{BUCKET}/k.npy", f"/{BUCKET}/k.npy", f"{OTHER}/k.npy", "justabucket", "plain/key.npy", "/lead/key",
    "dbl//slash", " padded key ", "\ttab", "trail ", "ctl\x01x", "del\x7f", ".", "..", "", "ünï/日本.npy",
    'quote"comma,x', "back\\slash", "new\nline", "cr\rx", "\\N", "NULL", "\\.", "a.b/..c/d..",
    f"s3://{BUCKET}/\u00fc%C3%BC", "%", "x/%", None,
]


def _policy(fmt: ReferenceFormat, percent_decode: bool = False, container: str = "none",
            query: str = "SELECT 1") -> tuple[BucketPolicy, ReferenceSource]:
    source = ReferenceSource(name="src", query=query, format=fmt, container=container,
                             percent_decode=percent_decode)
    bucket = BucketPolicy(name=BUCKET, enabled=True, min_age=timedelta(days=1), batch_size=1000,
                          description="", references=(source,))
    return bucket, source


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


def _jsonb_text(value: Any) -> str:
    # PostgreSQL prints jsonb with ", " and ": " separators; the fast path depends on that spelling.
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


@settings(max_examples=300, deadline=None)
@given(docs=st.lists(st.one_of(_simple_object, _simple_object, _json_value), max_size=30),
       fmt=st.sampled_from(FORMATS), percent_decode=st.booleans())
def test_vectorised_jsonb_matches_the_python_path(docs: list[Any], fmt: ReferenceFormat,
                                                  percent_decode: bool) -> None:
    texts = [_jsonb_text(doc) for doc in docs]
    bucket, source = _policy(fmt, percent_decode, "json")
    counts = ReferenceCounts()
    keys = normalise_jsonb_array(bucket, source, pa.array(texts, pa.string()), counts).to_pylist()
    # psycopg2 hands the general path decoded jsonb.
    assert (keys, counts) == _python([json.loads(text) for text in texts], fmt, percent_decode, "json")


def test_vectorised_jsonb_mixes_simple_and_other_rows_in_order() -> None:
    docs: list[Any] = [{"RX_000": f"k/{i}.npy", "RX_001": "a/../b"} for i in range(200)]
    docs[5] = [1, "x.npy", None]
    docs[150] = {"RX_000": {"nested": "y"}}
    docs[151] = "a string that is JSON text: [\"z.npy\"]"
    texts = [_jsonb_text(doc) for doc in docs]
    bucket, source = _policy(ReferenceFormat.KEY, False, "json")
    counts = ReferenceCounts()
    keys = normalise_jsonb_array(bucket, source, pa.array(texts), counts).to_pylist()
    assert (keys, counts) == _python([json.loads(text) for text in texts], ReferenceFormat.KEY, False, "json")


# --- against PostgreSQL: the whole read, fast path versus general path ---------------------


def _read(engine: sa.Engine, bucket: BucketPolicy, tmp_path: Path, fast: bool,
          monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, str]], tuple[Any, ...]]:
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(references, "_fast_source_keys", lambda *args: None)
        store = ManifestStore(str(tmp_path / ("fast" if fast else "general") / secrets.token_hex(4)))
        result = read_references_to_manifest(engine, bucket, store, "run-test")
    table = store.read_table(result.manifest_uri)
    rows = list(zip(table.column("key").to_pylist(), table.column("source").to_pylist(), strict=True))
    return rows, (result.referenced_count, result.reference_rows, result.other_bucket_reference_count,
                  result.unparseable_reference_count, result.unparseable_sample)


def _table(engine: sa.Engine, column_type: str, values: list[Any]) -> str:
    name = f"refs_{secrets.token_hex(4)}"
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE public.{name} (id serial PRIMARY KEY, v {column_type})"))
        for value in values:
            connection.execute(sa.text(f"INSERT INTO public.{name} (v) VALUES (CAST(:v AS {column_type}))"),
                               {"v": value})
    return f"SELECT v FROM public.{name} ORDER BY id"


def _table_from_array(engine: sa.Engine, values: list[str | None]) -> str:
    name = f"refs_{secrets.token_hex(4)}"
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE TABLE public.{name} (id serial PRIMARY KEY, v text)"))
        connection.execute(sa.text(f"INSERT INTO public.{name} (v) SELECT unnest(CAST(:values AS text[]))"),
                           {"values": values})
    return f"SELECT v FROM public.{name} ORDER BY id"


def _both_paths_agree(engine: sa.Engine, sources: list[ReferenceSource], tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    bucket = BucketPolicy(name=BUCKET, enabled=True, min_age=timedelta(days=1), batch_size=1000,
                          description="", references=tuple(sources))
    fast = _read(engine, bucket, tmp_path, True, monkeypatch)
    assert fast == _read(engine, bucket, tmp_path, False, monkeypatch)
    return fast[1]


_DB_VALUES = [value for value in FIXED_VALUES if value is None or "\x00" not in value]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("percent_decode", [False, True])
@pytest.mark.parametrize("column_type", ["text", "varchar(80)", "char(40)"])
def test_read_matches_the_general_path_for_string_columns(
    db_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: ReferenceFormat,
    percent_decode: bool, column_type: str,
) -> None:
    query = _table(db_engine, column_type, _DB_VALUES)
    source = ReferenceSource(name="s", query=query, format=fmt, percent_decode=percent_decode)
    _both_paths_agree(db_engine, [source], tmp_path, monkeypatch)


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_without_the_compiled_loops_matches_the_general_path(
    db_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: ReferenceFormat
) -> None:
    monkeypatch.setattr(native, "_native", None)
    values = [*_DB_VALUES, *(f"s3://{BUCKET}/plain/{i}.npy" for i in range(50))]
    source = ReferenceSource(name="s", query=_table(db_engine, "text", values), format=fmt)
    _both_paths_agree(db_engine, [source], tmp_path, monkeypatch)


def test_a_block_of_plain_values_keeps_every_key(
    db_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Enough rows for several COPY blocks, all plain: the whole-block shortcut, then one odd value.
    query = (f"SELECT 's3://{BUCKET}/sessions/' || g || '/websdr_' || (g % 7) || '.npy' "
             f"FROM generate_series(1, 200000) AS g UNION ALL SELECT 's3://{BUCKET}//odd.npy'")
    source = ReferenceSource(name="s", query=query, format=ReferenceFormat.URI)
    figures = _both_paths_agree(db_engine, [source], tmp_path, monkeypatch)
    assert figures[:2] == (200_001, 200_001)


def test_read_matches_the_general_path_for_json_columns(
    db_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs: list[Any] = [{"RX_000": f"k/{i}.npy", "RX_001": f"s3://{BUCKET}/x"} for i in range(100)]
    docs += [[1, "a.npy", None, {"n": "b"}], "c.npy", '["d.npy"]', {}, [], {"RX": None}, 3.5, True,
             {"ü": "日本/ü.npy", "q": 'quo"te', "t": "tab\t", "b": "back\\slash"}, None]
    json_texts = [None if doc is None else json.dumps(doc) for doc in docs]
    sources = [
        ReferenceSource(name="jsonb", query=_table(db_engine, "jsonb", json_texts), container="json"),
        ReferenceSource(name="json", query=_table(db_engine, "json", json_texts), container="json"),
        ReferenceSource(name="text", query=_table(db_engine, "text", [*json_texts, "not json", ""]),
                        container="json"),
    ]
    figures = _both_paths_agree(db_engine, sources, tmp_path, monkeypatch)
    assert figures[3] > 0  # the odd values really were unparseable


def test_non_string_columns_take_the_general_path(
    db_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = [ReferenceSource(name="int", query="SELECT g FROM generate_series(1, 3) AS g"),
               ReferenceSource(name="jsonb-none", query="SELECT '{\"a\": \"b\"}'::jsonb"),
               ReferenceSource(name="two-columns", query="SELECT 'k.npy' AS v, 1 AS heimdall_ref_0"),
               ReferenceSource(name="empty", query="SELECT 'x'::text WHERE false")]
    figures = _both_paths_agree(db_engine, sources, tmp_path, monkeypatch)
    assert figures[3] == 4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(tricky_value.filter(lambda v: "\x00" not in v), st.none()), max_size=30),
       fmt=st.sampled_from(FORMATS), percent_decode=st.booleans())
def test_read_matches_the_general_path_on_generated_values(
    db_engine: sa.Engine, tmp_path: Path, values: list[str | None], fmt: ReferenceFormat, percent_decode: bool,
) -> None:
    source = ReferenceSource(name="s", query=_table(db_engine, "text", values), format=fmt,
                             percent_decode=percent_decode)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _both_paths_agree(db_engine, [source], tmp_path, monkeypatch)


def test_fast_path_is_used_for_text_and_jsonb(
    db_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    original = references.copy_row_blocks

    def counting(raw: Any, query: str, columns: int = 1) -> Any:
        calls.append(query)
        return original(raw, query, columns)

    monkeypatch.setattr(references, "copy_row_blocks", counting)
    bucket = BucketPolicy(name=BUCKET, enabled=True, min_age=timedelta(days=1), batch_size=1000, description="",
                          references=(ReferenceSource(name="t", query="SELECT 'a.npy'::text"),
                                      ReferenceSource(name="j", query="""SELECT '{"x": "b.npy"}'::jsonb""",
                                                      container="json")))
    result = read_references_to_manifest(db_engine, bucket, ManifestStore(str(tmp_path)), "run")
    assert len(calls) == 2
    assert result.referenced_count == 2


def test_an_error_half_way_through_copy_is_raised_as_on_the_general_path(
    db_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    query = "SELECT 'k' || (1 / (50000 - g))::text FROM generate_series(1, 100000) AS g"
    bucket = BucketPolicy(name=BUCKET, enabled=True, min_age=timedelta(days=1), batch_size=1000, description="",
                          references=(ReferenceSource(name="s", query=query),))
    raised = []
    for fast in (True, False):
        with pytest.raises(sa.exc.DBAPIError) as caught:
            _read(db_engine, bucket, tmp_path, fast, monkeypatch)
        raised.append(type(caught.value))
        assert "division by zero" in str(caught.value)
    assert raised[0] is raised[1]
    assert not list((tmp_path / "fast").rglob("*.parquet"))


def test_a_missing_table_fails_clearly(db_engine: sa.Engine, tmp_path: Path) -> None:
    bucket, _ = _policy(ReferenceFormat.KEY, query="SELECT v FROM public.no_such_table")
    with pytest.raises(ReferenceDatabaseError, match=r"a reference query failed on .*no_such_table"):
        read_references_to_manifest(db_engine, bucket, ManifestStore(str(tmp_path)), "run")


def test_copy_through_psycopg2_reads_what_the_compiled_copy_reads(
    db_engine: sa.Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the compiled COPY does not apply (copy_applies false), copy_expert writes into a
    # pipe that a thread cuts into blocks: the same rows, escapes and NULLs included.
    values = [*_DB_VALUES, *(f"s3://{BUCKET}/plain/{i}.npy" for i in range(30_000))]
    source = ReferenceSource(name="s", query=_table_from_array(db_engine, values), format=ReferenceFormat.URI)
    bucket = BucketPolicy(name=BUCKET, enabled=True, min_age=timedelta(days=1), batch_size=1000, description="",
                          references=(source,))
    used: list[bool] = []
    real = references.copy_applies
    monkeypatch.setattr(references, "copy_applies", lambda raw: used.append(real(raw)) or used[-1])
    compiled = _read(db_engine, bucket, tmp_path / "compiled", True, monkeypatch)
    monkeypatch.setattr(references, "copy_applies", lambda raw: False)
    piped = _read(db_engine, bucket, tmp_path / "piped", True, monkeypatch)
    assert used == [True]
    assert compiled == piped
    assert len(compiled[0]) > 30_000
