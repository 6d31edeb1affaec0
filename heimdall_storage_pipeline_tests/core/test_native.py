"""The compiled loops (core/_native.c) against their numpy fallbacks and the regex they stand in for."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core import native
from heimdall_storage_pipeline.core.keys import NEEDS_NORMALISATION_PATTERN

_ALPHABET = list("ab/.%_ \t\r\x00\x01\x1f\x7f\\\u00fc\u65e5\U0001f600")
_values = st.lists(st.text(alphabet=_ALPHABET, max_size=10), max_size=40)


def test_the_extension_is_built() -> None:
    # make install compiles it; a machine without a compiler still works, only slower.
    assert native.NATIVE


@pytest.fixture
def numpy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_native", None)


def _split_both(rows: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    text = "".join(f"{row}\n" for row in rows).encode()
    block = bytearray(text + b"partial row")  # bytes after rows_end are not rows
    compiled = native.split_rows(block, len(text)).to_pylist()
    with monkeypatch.context() as patch:
        patch.setattr(native, "_native", None)
        fallback = native.split_rows(block, len(text)).to_pylist()
    return compiled, fallback


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.text(alphabet=[c for c in _ALPHABET if c != "\n"], max_size=12), max_size=30))
def test_split_rows_compiled_equals_numpy(rows: list[str]) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        compiled, fallback = _split_both(rows, monkeypatch)
    assert compiled == fallback == rows


@settings(max_examples=300, deadline=None)
@given(values=_values, skip=st.integers(0, 3), extra=st.sampled_from(["", "%"]))
def test_all_plain_is_true_only_when_no_value_needs_work(values: list[str], skip: int, extra: str) -> None:
    array = pa.array(values, pa.string())
    pattern = re.compile(NEEDS_NORMALISATION_PATTERN + ("|%" if extra else ""))
    needs_work = any(
        len(value.encode()) <= skip or pattern.search(value.encode()[skip:].decode(errors="replace"))
        for value in values
    )
    if native.all_plain(array, skip, extra):
        assert not needs_work
    # The compiled check is exact enough to pass ordinary keys.
    plain = [v for v in values if v and not pattern.search(v) and not v.startswith(".") and "/." not in v]
    assert native.all_plain(pa.array(plain, pa.string()), 0, extra)


def test_all_plain_falls_back_to_the_per_value_path_without_the_extension(numpy_only: None) -> None:
    assert not native.all_plain(pa.array(["plain/key.npy"]))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.text(alphabet=_ALPHABET, max_size=30), max_size=50), pad=st.integers(0, 3))
def test_hash64_compiled_equals_numpy_and_ignores_position(values: list[str], pad: int) -> None:
    array = pa.array(["x" * 7] * pad + values, pa.string()).slice(pad)
    compiled = native.hash_strings64(array)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(native, "_native", None)
        fallback = native.hash_strings64(array)
    assert compiled.tolist() == fallback.tolist()
    assert compiled.tolist() == native.hash_strings64(pa.array(values, pa.string())).tolist()


def test_hash64_separates_near_misses() -> None:
    keys = ["a", "a\x00", "\x00a", "", "ab", "ba", *(f"sessions/{i}/websdr_1.npy" for i in range(100_000))]
    hashes = native.hash_strings64(pa.array(keys))
    assert len(np.unique(hashes)) == len(keys)


_member_text = st.text(alphabet=list('ab/ ,:{}"\\\u00fc'), max_size=6)
_jsonb_text = st.one_of(
    st.dictionaries(_member_text, _member_text, max_size=4).map(lambda d: json.dumps(d, ensure_ascii=False)),
    st.sampled_from(['{"a": 1}', '{"a": {"b": "c"}}', '["x"]', '"x"', "{}", '{"a": "b"}}', '{"a": "b", }', "{",
                     '{"a" : "b"}', '{"a": "b","c": "d"}', "", '{"a": "b\\"c"}', '{":": ", ", "": ""}',
                     '{"k": ": ", ", ": "v"}']),
)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(_jsonb_text, max_size=20))
def test_object_values_compiled_equals_the_arrow_version(texts: list[str]) -> None:
    array = pa.array(texts, pa.string())
    compiled = _values_per_text(*native.object_values(array))
    fallback = _values_per_text(*native._object_values_arrow(array))
    for text, ours, theirs in zip(texts, compiled, fallback, strict=True):
        # Each expands a text exactly as JSON decoding would, or declines it (None: decoded
        # instead). The fallback declines more: '{}' and strings holding ',' or ':'.
        for expanded in (ours, theirs):
            assert expanded is None or expanded == list(json.loads(text).values())
        assert ours is not None or theirs is None


def _values_per_text(values: pa.Array, members: np.ndarray) -> list[list[str] | None]:
    flat, start, per_text = values.to_pylist(), 0, []
    for count in members.tolist():
        per_text.append(None if count < 0 else flat[start:start + count])
        start += max(count, 0)
    return per_text


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.text(alphabet=[c for c in _ALPHABET if c != "\n"], max_size=12), max_size=30),
       prefix=st.sampled_from(["", "s3://b/", "b/"]), prefixed=st.booleans(), extra=st.sampled_from(["", "%"]))
def test_plain_keys_is_split_strip_and_hash_in_one_pass_or_declines(
    values: list[str], prefix: str, prefixed: bool, extra: str
) -> None:
    rows = [prefix + v if prefixed else v for v in values]
    text = "".join(f"{row}\n" for row in rows).encode()
    block = bytearray(text + b"partial row")
    result = native.plain_keys(block, len(text), prefix, extra)
    stripped = [row.encode()[len(prefix.encode()):].decode(errors="replace") for row in rows]
    eligible = all(row.startswith(prefix) for row in rows) and "\\" not in text.decode() and native.all_plain(
        pa.array(stripped, pa.string()), 0, extra)
    if not eligible:
        assert result is None
        return
    assert result is not None
    keys, hashes = result
    assert keys.to_pylist() == stripped
    assert hashes.tolist() == native.hash_strings64(pa.array(stripped, pa.string())).tolist()


def test_plain_keys_declines_without_the_extension(numpy_only: None) -> None:
    block = bytearray(b"s3://b/k.npy\n")
    assert native.plain_keys(block, len(block), "s3://b/") is None


def test_plain_keys_hashes_keys_longer_than_the_power_table_as_hash64_does() -> None:
    keys = ["k" * 1023, "a/" + "x" * 2000, "b" * 1025]
    block = bytearray("".join(f"s3://b/{key}\n" for key in keys).encode())
    result = native.plain_keys(block, len(block), "s3://b/")
    assert result is not None
    assert result[1].tolist() == native.hash_strings64(pa.array(keys, pa.string())).tolist()


# --- COPY without a Python call per row (copy_applies / copy_blocks) ---------------------------

_ROWS_SQL = ("COPY (SELECT CASE WHEN g = 7 THEN repeat('x', 3000) ELSE 'row-' || g || E'\\ttab' END "
             "FROM generate_series(1, 2000) AS g) TO STDOUT")


@pytest.fixture
def pg_connection(database_url: str) -> Iterator[Any]:
    import psycopg2

    url = sa.make_url(database_url)
    connection = psycopg2.connect(host=url.host, port=url.port, user=url.username, dbname=url.database)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")  # psycopg2 begins the transaction the COPY runs in
        yield connection
    finally:
        connection.close()


def _copy_expert(connection: Any, sql: str) -> bytes:
    sink = io.BytesIO()
    with connection.cursor() as cursor:
        cursor.copy_expert(sql, sink)
    return sink.getvalue()


def _collecting(blocks: list[tuple[int, bytes]], go_on: bool = True) -> Callable[[bytearray, int], bool]:
    def deliver(block: bytearray, used: int) -> bool:
        blocks.append((len(block), bytes(block[:used])))
        return go_on

    return deliver


def test_copy_blocks_hands_over_whole_rows_exactly_as_copy_expert_writes_them(pg_connection: Any) -> None:
    assert native.copy_applies(pg_connection)
    blocks: list[tuple[int, bytes]] = []
    native.copy_blocks(pg_connection, _ROWS_SQL, 1024, _collecting(blocks))
    assert b"".join(data for _, data in blocks) == _copy_expert(pg_connection, _ROWS_SQL)
    assert len(blocks) > 10
    assert all(data.endswith(b"\n") for _, data in blocks)  # whole rows only
    # Blocks keep to their size, but for the one row longer than a block, which gets its own.
    assert [size for size, _ in blocks if size != 1024] == [3001]
    assert all(len(data) <= size for size, data in blocks)


def test_copy_blocks_stopped_early_leaves_the_connection_ready(pg_connection: Any) -> None:
    delivered: list[tuple[int, bytes]] = []
    native.copy_blocks(pg_connection, _ROWS_SQL, 1024, _collecting(delivered, go_on=False))
    assert len(delivered) == 1  # nothing after deliver said stop
    with pg_connection.cursor() as cursor:
        cursor.execute("SELECT 42")
        assert cursor.fetchone() == (42,)


def test_copy_blocks_raises_the_callbacks_error_after_draining(pg_connection: Any) -> None:
    def deliver(block: bytearray, used: int) -> bool:
        raise KeyError("consumer failed")

    with pytest.raises(KeyError, match="consumer failed"):
        native.copy_blocks(pg_connection, _ROWS_SQL, 1024, deliver)
    with pg_connection.cursor() as cursor:
        cursor.execute("SELECT 43")
        assert cursor.fetchone() == (43,)


def test_copy_blocks_raises_psycopg2s_error_class_for_a_failing_statement(pg_connection: Any) -> None:
    import psycopg2.errors

    sql = "COPY (SELECT 'k' || (1 / (1500 - g)) FROM generate_series(1, 3000) AS g) TO STDOUT"
    delivered: list[tuple[int, bytes]] = []
    with pytest.raises(psycopg2.errors.DivisionByZero, match="division by zero"):
        native.copy_blocks(pg_connection, sql, 1024, _collecting(delivered))
    assert delivered  # rows before the failure arrived; the caller discards them
    pg_connection.rollback()
    with pytest.raises(psycopg2.errors.UndefinedTable):
        native.copy_blocks(pg_connection, "COPY (SELECT * FROM no_such_table) TO STDOUT", 1024, _collecting([]))


def test_copy_applies_only_where_copy_blocks_can_run(pg_connection: Any, database_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg2

    pg_connection.rollback()  # idle: psycopg2 would send BEGIN before the COPY, so copy_expert runs it
    assert not native.copy_applies(pg_connection)
    pg_connection.autocommit = True
    assert native.copy_applies(pg_connection)
    url = sa.make_url(database_url)
    asynchronous = psycopg2.connect(host=url.host, port=url.port, user=url.username, dbname=url.database, async_=1)
    try:
        assert not native.copy_applies(asynchronous)
    finally:
        asynchronous.close()
    monkeypatch.setattr(native, "_native", None)
    assert not native.copy_applies(pg_connection)
