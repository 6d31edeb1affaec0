"""Key normalisation and reference parsing: pure logic, no server."""

from __future__ import annotations

import pytest

from heimdall_storage_pipeline.core.keys import (
    InvalidKeyError,
    ParsedKind,
    ReferenceFormat,
    expand_container,
    normalize_key,
    parse_reference,
)

BUCKET = "heimdall-raw-iq"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a/b.npy", "a/b.npy"),
        ("/a/b.npy", "a/b.npy"),
        ("///a//b///c.npy", "a/b/c.npy"),
        ("with space/ key .npy", "with space/ key .npy"),
        ("ünïcödé/ключ.npy", "ünïcödé/ключ.npy"),
        ("plus+sign", "plus+sign"),
        ("percent%20stays", "percent%20stays"),
        ("dir/", "dir/"),
        ("a.b/..c/d..", "a.b/..c/d.."),  # dots inside a segment are fine
    ],
)
def test_normalize_key_canonical_forms(raw: str, expected: str) -> None:
    assert normalize_key(raw) == expected


@pytest.mark.parametrize("raw", ["", "/", "//", "a/./b", "a/../b", "..", ".", "a/\x00b", "tab\tkey", "x\x7f"])
def test_normalize_key_refuses_unsafe_values(raw: str) -> None:
    with pytest.raises(InvalidKeyError):
        normalize_key(raw)


@pytest.mark.parametrize(
    ("value", "fmt", "key"),
    [
        ("sessions/t/websdr_1.npy", ReferenceFormat.KEY, "sessions/t/websdr_1.npy"),
        ("sessions//t/websdr_1.npy", ReferenceFormat.KEY, "sessions/t/websdr_1.npy"),
        (" padded/key.npy ", ReferenceFormat.KEY, " padded/key.npy "),
        (f"s3://{BUCKET}/sessions/t/websdr_1.npy", ReferenceFormat.URI, "sessions/t/websdr_1.npy"),
        (f"S3://{BUCKET}//sessions/t/websdr_1.npy", ReferenceFormat.URI, "sessions/t/websdr_1.npy"),
        (f"{BUCKET}/sessions/t/websdr_1.npy", ReferenceFormat.BUCKET_KEY, "sessions/t/websdr_1.npy"),
        (f"/{BUCKET}/sessions/t/websdr_1.npy", ReferenceFormat.BUCKET_KEY, "sessions/t/websdr_1.npy"),
    ],
)
def test_parse_reference_every_format(value: str, fmt: ReferenceFormat, key: str) -> None:
    parsed = parse_reference(value, BUCKET, fmt)
    assert parsed.kind is ParsedKind.KEY
    assert parsed.key == key


@pytest.mark.parametrize(
    ("value", "fmt"),
    [
        ("s3://heimdall-audio-chunks/sessions/t/websdr_1.npy", ReferenceFormat.URI),
        ("heimdall-audio-chunks/sessions/t/websdr_1.npy", ReferenceFormat.BUCKET_KEY),
    ],
)
def test_other_bucket_is_reported_not_matched(value: str, fmt: ReferenceFormat) -> None:
    parsed = parse_reference(value, BUCKET, fmt)
    assert parsed.kind is ParsedKind.OTHER_BUCKET
    assert parsed.key == ""


@pytest.mark.parametrize(
    ("value", "fmt", "problem"),
    [
        ("sessions/t/websdr_1.npy", ReferenceFormat.URI, "s3://"),
        ("http://host/heimdall-raw-iq/x", ReferenceFormat.URI, "s3://"),
        (f"s3://{BUCKET}", ReferenceFormat.URI, "without bucket or key"),
        ("s3:///key", ReferenceFormat.URI, "without bucket or key"),
        (f"s3://{BUCKET}/", ReferenceFormat.URI, "empty"),
        (f"s3://{BUCKET}/a/../b", ReferenceFormat.URI, ".."),
        ("justabucket", ReferenceFormat.BUCKET_KEY, "bucket/key"),
        ("a/./b", ReferenceFormat.KEY, "'.'"),
        ("", ReferenceFormat.KEY, "empty"),
        (42, ReferenceFormat.KEY, "not a string: int"),
        ({"nested": "a"}, ReferenceFormat.KEY, "not a string: dict"),
    ],
)
def test_unparseable_values_name_the_problem(value: object, fmt: ReferenceFormat, problem: str) -> None:
    parsed = parse_reference(value, BUCKET, fmt)
    assert parsed.kind is ParsedKind.UNPARSEABLE
    assert parsed.key == ""
    assert problem in parsed.problem


def test_percent_decoding_is_off_by_default() -> None:
    parsed = parse_reference(f"s3://{BUCKET}/a%20b%2Bc", BUCKET, ReferenceFormat.URI)
    assert parsed.key == "a%20b%2Bc"


@pytest.mark.parametrize(
    ("encoded", "key"),
    [
        ("a%20b%2Bc", "a b+c"),
        ("plus+stays", "plus+stays"),  # '+' is not a space in a path
        ("%C3%BCnic%C3%B6de", "ünicöde"),
        ("a%2F%2Fb", "a/b"),  # decoded before '//' collapses
        ("100%25", "100%"),
    ],
)
def test_percent_decoding_when_enabled(encoded: str, key: str) -> None:
    parsed = parse_reference(f"s3://{BUCKET}/{encoded}", BUCKET, ReferenceFormat.URI, percent_decode=True)
    assert (parsed.kind, parsed.key) == (ParsedKind.KEY, key)


@pytest.mark.parametrize(
    ("encoded", "problem"),
    [("a%zzb", "malformed"), ("a%2", "malformed"), ("a%FFb", "UTF-8"), ("a/%2e%2e/b", "..")],
)
def test_percent_decoding_refuses_bad_sequences(encoded: str, problem: str) -> None:
    parsed = parse_reference(encoded, BUCKET, ReferenceFormat.KEY, percent_decode=True)
    assert parsed.kind is ParsedKind.UNPARSEABLE
    assert problem in parsed.problem


def test_expand_container_none_passes_the_value_through() -> None:
    assert list(expand_container('{"a": "b"}', "none")) == ['{"a": "b"}']


@pytest.mark.parametrize(
    ("value", "items"),
    [
        ({"RX_001": "a.npy", "RX_004": "b.npy"}, ["a.npy", "b.npy"]),  # jsonb decoded by psycopg2
        (["a.npy", "b.npy"], ["a.npy", "b.npy"]),
        ('{"RX_001": "a.npy"}', ["a.npy"]),  # json as text
        ('["a.npy", null]', ["a.npy", None]),
        ('"a.npy"', ["a.npy"]),
        ("7", [7]),
    ],
)
def test_expand_container_json(value: object, items: list[object]) -> None:
    assert list(expand_container(value, "json")) == items


def test_a_json_container_that_is_not_json_is_unparseable() -> None:
    """A bare key in a column declared as JSON must be reported, not silently matched."""
    (item,) = expand_container("sessions/t/websdr_1.npy", "json")
    parsed = parse_reference(item, BUCKET, ReferenceFormat.KEY)
    assert parsed.kind is ParsedKind.UNPARSEABLE
    assert "JSON" in parsed.problem
    assert "sessions/t/websdr_1.npy" in repr(item)
