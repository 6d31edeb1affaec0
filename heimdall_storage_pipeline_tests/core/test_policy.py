"""The storage policy: the shipped file, and broken files refused with file, bucket and field named."""

from __future__ import annotations

import copy
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from heimdall_storage_pipeline.core.keys import ReferenceFormat
from heimdall_storage_pipeline.core.policy import (
    DELETE_OBJECTS_LIMIT,
    POLICY_ENV_VAR,
    BucketPolicy,
    CompanionRule,
    PolicyError,
    ReferenceSource,
    default_policy_path,
    format_duration,
    load_policy,
    parse_duration,
    parse_policy,
)

BUCKET = "good-bucket"


def valid_document() -> dict[str, Any]:
    return {
        "manifest_retention_days": 14,
        "buckets": {
            BUCKET: {
                "enabled": True,
                "min_age_days": 30,
                "batch_size": 500,
                "description": "test bucket",
                "references": [
                    {"name": "rows", "query": "SELECT path FROM app.files", "format": "key"},
                ],
                "companions": [
                    {"name": "sidecar", "match": r"^(.+)\.npy$", "companion": r"\1_metadata.json"}
                ],
            }
        },
    }


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False))
    return path


def broken(change: Any) -> dict[str, Any]:
    document = valid_document()
    change(document)
    return document


def bucket_of(document: dict[str, Any]) -> dict[str, Any]:
    return document["buckets"][BUCKET]


def source_of(document: dict[str, Any]) -> dict[str, Any]:
    return bucket_of(document)["references"][0]


def test_valid_document_loads(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, valid_document()))
    bucket = policy.bucket(BUCKET)
    assert bucket.min_age == timedelta(days=30)
    assert bucket.batch_size == 500
    assert bucket.references[0].format is ReferenceFormat.KEY
    assert bucket.companions[0].companion == r"\1_metadata.json"
    assert bucket.references[0].statement_timeout == timedelta(minutes=10)
    assert policy.enabled_buckets() == [bucket]


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), (500107862016, 500107862016), ("466 GiB", 466 * 1024**3), ("500GB", 500 * 1000**3),
    ("1.5 TiB", int(1.5 * 1024**4)), ("2048 b", 2048), ("64 KiB", 65536),
])
def test_capacity_in_bytes_or_with_a_unit(tmp_path: Path, value: Any, expected: int | None) -> None:
    document = valid_document() if value is None else {**valid_document(), "capacity_bytes": value}
    assert load_policy(write(tmp_path, document)).capacity_bytes == expected


def test_statement_timeout_per_source(tmp_path: Path) -> None:
    document = valid_document()
    source_of(document)["statement_timeout"] = "90s"
    assert load_policy(write(tmp_path, document)).bucket(BUCKET).references[0].statement_timeout == timedelta(
        seconds=90
    )


def test_shipped_heimdall_policy() -> None:
    policy = load_policy(default_policy_path())
    by_name = {bucket.name: bucket for bucket in policy.enabled_buckets()}
    assert set(by_name) == {"heimdall-synthetic-iq", "heimdall-audio-chunks", "heimdall-raw-iq"}
    assert by_name["heimdall-synthetic-iq"].min_age == timedelta(days=30)
    assert by_name["heimdall-audio-chunks"].min_age == timedelta(days=30)
    assert by_name["heimdall-raw-iq"].min_age == timedelta(days=60)
    assert by_name["heimdall-synthetic-iq"].references[0].container == "json"
    assert by_name["heimdall-audio-chunks"].references[0].format is ReferenceFormat.URI
    assert by_name["heimdall-raw-iq"].references[0].format is ReferenceFormat.URI
    assert by_name["heimdall-raw-iq"].companions
    assert policy.manifest_retention_days == 14
    assert not policy.allow_short_min_age


def test_policy_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(POLICY_ENV_VAR, str(write(tmp_path, valid_document())))
    assert [bucket.name for bucket in load_policy().buckets] == [BUCKET]


def test_unknown_partition_names_the_known_buckets(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, valid_document()))
    with pytest.raises(PolicyError, match=f"'other-bucket' is not in the policy.*{BUCKET}"):
        policy.bucket("other-bucket")


BROKEN_CASES = [
    # (id, change, words the message must contain besides the file name)
    ("unknown root key", lambda d: d.update(bukets={}), ["unknown key(s) bukets"]),
    ("unknown bucket key", lambda d: bucket_of(d).update(min_age_dayz=3), [BUCKET, "min_age_dayz"]),
    ("unknown source key", lambda d: source_of(d).update(colum="x"), [BUCKET, "references[0]", "colum"]),
    ("unknown companion key", lambda d: bucket_of(d)["companions"][0].update(replace="x"),
     [BUCKET, "companions[0]", "replace"]),
    ("enabled not bool", lambda d: bucket_of(d).update(enabled="yes"), [BUCKET, "enabled", "bool"]),
    ("batch_size a string", lambda d: bucket_of(d).update(batch_size="10"), [BUCKET, "batch_size"]),
    ("batch_size a bool", lambda d: bucket_of(d).update(batch_size=True), [BUCKET, "batch_size"]),
    ("batch_size 0", lambda d: bucket_of(d).update(batch_size=0), [BUCKET, "batch_size", "1..1000"]),
    ("batch_size 1001", lambda d: bucket_of(d).update(batch_size=1001), [BUCKET, "batch_size", "1..1000"]),
    ("description not str", lambda d: bucket_of(d).update(description=5), [BUCKET, "description"]),
    ("min_age_days a string", lambda d: bucket_of(d).update(min_age_days="thirty"), [BUCKET, "min_age_days"]),
    ("no min age", lambda d: bucket_of(d).pop("min_age_days"), [BUCKET, "min_age_days"]),
    ("both min ages", lambda d: bucket_of(d).update(min_age="30d"), [BUCKET, "not both"]),
    ("bad duration", lambda d: (bucket_of(d).pop("min_age_days"), bucket_of(d).update(min_age="30 days")),
     [BUCKET, "min_age", "'30d'"]),
    ("negative days", lambda d: bucket_of(d).update(min_age_days=-1), [BUCKET, "min_age_days", "negative"]),
    ("short min age", lambda d: (bucket_of(d).pop("min_age_days"), bucket_of(d).update(min_age="12h")),
     [BUCKET, "below one day", "allow_short_min_age"]),
    ("short min age in days", lambda d: bucket_of(d).update(min_age_days=0.5), [BUCKET, "below one day"]),
    ("no sources", lambda d: bucket_of(d).update(references=[]),
     [BUCKET, "references", "no reference sources"]),
    ("sources missing", lambda d: bucket_of(d).pop("references"), [BUCKET, "references"]),
    ("sources not a list", lambda d: bucket_of(d).update(references={"q": "SELECT 1"}),
     [BUCKET, "references", "list"]),
    ("source without query", lambda d: source_of(d).pop("query"), [BUCKET, "references[0]", "query"]),
    ("delete query", lambda d: source_of(d).update(query="DELETE FROM app.files"),
     [BUCKET, "references[0].query", "SELECT"]),
    ("two statements", lambda d: source_of(d).update(query="SELECT 1; DROP TABLE x"),
     [BUCKET, "references[0].query", "single statement"]),
    ("writing CTE", lambda d: source_of(d).update(
        query="WITH d AS (DELETE FROM app.files RETURNING path) SELECT path FROM d"),
     [BUCKET, "references[0].query", "DELETE"]),
    ("row locks", lambda d: source_of(d).update(query="SELECT path FROM app.files FOR SHARE"),
     [BUCKET, "references[0].query", "FOR SHARE", "lock rows"]),
    ("select into", lambda d: source_of(d).update(query="SELECT path INTO copy FROM app.files"),
     [BUCKET, "references[0].query", "INTO"]),
    ("empty query", lambda d: source_of(d).update(query="  "), [BUCKET, "references[0].query"]),
    ("query not a string", lambda d: source_of(d).update(query=["SELECT 1"]),
     [BUCKET, "references[0].query"]),
    ("unknown format", lambda d: source_of(d).update(format="url"), [BUCKET, "references[0].format", "url"]),
    ("unknown container", lambda d: source_of(d).update(container="csv"),
     [BUCKET, "references[0].container", "csv"]),
    ("percent_decode not bool", lambda d: source_of(d).update(percent_decode="yes"),
     [BUCKET, "percent_decode"]),
    ("statement_timeout not a duration", lambda d: source_of(d).update(statement_timeout="soon"),
     [BUCKET, "references[0].statement_timeout", "'30d'"]),
    ("statement_timeout too long", lambda d: source_of(d).update(statement_timeout="2d"),
     [BUCKET, "references[0].statement_timeout", "1s..1d"]),
    ("statement_timeout zero", lambda d: source_of(d).update(statement_timeout="0s"),
     [BUCKET, "references[0].statement_timeout", "1s..1d"]),
    ("duplicate source names", lambda d: bucket_of(d)["references"].append(dict(source_of(d))),
     [BUCKET, "unique"]),
    ("bad regex", lambda d: bucket_of(d)["companions"][0].update(match="(["),
     [BUCKET, "companions[0].match", "regular expression"]),
    ("regex RE2 cannot run", lambda d: bucket_of(d)["companions"][0].update(match=r"^(?=x)(.+)\.npy$"),
     [BUCKET, "companions[0].match", "RE2"]),
    ("companion group missing", lambda d: bucket_of(d)["companions"][0].update(companion=r"\2.json"),
     [BUCKET, "companions[0].companion", "group"]),
    ("companion owner untold", lambda d: bucket_of(d)["companions"][0].update(match=r"(.+)\.npy$"),
     [BUCKET, "companions[0]", "owner", "anchored"]),
    ("companion group unused", lambda d: bucket_of(d)["companions"][0].update(match=r"^(.+)\.(npy|npz)$"),
     [BUCKET, "companions[0]", "group(s) [2]"]),
    ("companion without match", lambda d: bucket_of(d)["companions"][0].pop("match"),
     [BUCKET, "companions[0]", "match"]),
    ("companions not a list", lambda d: bucket_of(d).update(companions={"a": 1}), [BUCKET, "companions"]),
    ("retention 0", lambda d: d.update(manifest_retention_days=0), ["manifest_retention_days"]),
    ("retention a string", lambda d: d.update(manifest_retention_days="14"), ["manifest_retention_days"]),
    ("allow_short not bool", lambda d: d.update(allow_short_min_age="true"), ["allow_short_min_age"]),
    ("buckets empty", lambda d: d.update(buckets={}), ["buckets"]),
    ("capacity not a size", lambda d: d.update(capacity_bytes="lots"),
     ["capacity_bytes: expected a number of bytes or a size like '466 GiB' or '500 GB', got 'lots'"]),
    ("capacity zero", lambda d: d.update(capacity_bytes=0), ["capacity_bytes: must be positive, got 0"]),
    ("capacity a bool", lambda d: d.update(capacity_bytes=True), ["capacity_bytes: expected a number of bytes"]),
    ("bucket settings not a mapping", lambda d: d["buckets"].update({BUCKET: "on"}), [BUCKET, "mapping"]),
]


@pytest.mark.parametrize(
    ("change", "words"), [case[1:] for case in BROKEN_CASES], ids=[c[0] for c in BROKEN_CASES]
)
def test_broken_policy_names_file_bucket_and_field(tmp_path: Path, change: Any, words: list[str]) -> None:
    path = write(tmp_path, broken(change))
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    message = str(raised.value)
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize(
    "name",
    ["Upper-Case", "ab", "a" * 64, "under_score", "-leading", "trailing-", "double..dot", "192.168.0.1",
     "xn--punycode", "space name"],
)
def test_invalid_bucket_names(tmp_path: Path, name: str) -> None:
    document = valid_document()
    document["buckets"] = {name: copy.deepcopy(bucket_of(valid_document()))}
    path = write(tmp_path, document)
    with pytest.raises(PolicyError, match="not a valid S3 bucket name") as raised:
        load_policy(path)
    assert str(path) in str(raised.value)
    assert repr(name) in str(raised.value)


def test_short_min_age_allowed_when_the_policy_says_so(tmp_path: Path) -> None:
    document = valid_document()
    document["allow_short_min_age"] = True
    bucket_of(document).pop("min_age_days")
    bucket_of(document)["min_age"] = "90s"
    assert load_policy(write(tmp_path, document)).bucket(BUCKET).min_age == timedelta(seconds=90)


@pytest.mark.parametrize(
    "query",
    [
        "select path from app.files",
        "WITH x AS (SELECT path FROM app.files) SELECT path FROM x;",
        "SELECT path FROM app.files WHERE note <> 'delete; drop table x'",  # words inside strings are data
        "SELECT path -- delete later\nFROM app.files",
        "SELECT updated_path, created_at FROM app.files",  # keywords only as whole words
    ],
)
def test_read_only_queries_accepted(tmp_path: Path, query: str) -> None:
    document = valid_document()
    source_of(document)["query"] = query
    assert load_policy(write(tmp_path, document)).bucket(BUCKET).references[0].query.startswith(query[:6])


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT path FROM app.files WHERE owner = :owner", "contains ':owner', which is read as a bind parameter"),
        ("SELECT path FROM app.files WHERE tag = 'a :b'", "contains ':b'"),
        ("SELECT path FROM app.files WHERE tag = 'x\\:y'", "some reads rewrite to ':'"),
    ],
)
def test_queries_the_reads_would_see_differently_are_refused(tmp_path: Path, query: str, message: str) -> None:
    document = valid_document()
    source_of(document)["query"] = query
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(write(tmp_path, document))
    source_of(document)["query"] = "SELECT path::text FROM app.files WHERE tag = 'a:b'"  # casts and colons
    assert load_policy(write(tmp_path, document)).bucket(BUCKET).references


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "buckets: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(path)
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match=f"{missing}: policy file not found.*{POLICY_ENV_VAR}"):
        load_policy(missing)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("15m", timedelta(minutes=15)),
     ("90s", timedelta(seconds=90)), (" 1.5d ", timedelta(days=1.5)), (7, timedelta(days=7))],
)
def test_parse_duration(value: object, expected: timedelta) -> None:
    assert parse_duration(value, "here") == expected


@pytest.mark.parametrize("value", ["30", "30 days", "d", "-1d", "1w", True, None])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(PolicyError, match="here"):
        parse_duration(value, "here")


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    document = valid_document()
    document["manifest_retention_days"] = 0
    bucket_of(document).update(batch_size=0, enabled="yes", colour="blue", shade=1)
    source_of(document).update(format="url")
    bucket_of(document)["references"].append({"query": "DELETE FROM app.files"})
    document["buckets"]["Second_Bucket"] = {"min_age": "12h", "references": []}
    document["buckets"]["third-bucket"] = "on"
    path = write(tmp_path, document)
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    lines = str(raised.value).splitlines()
    expected = [
        f"buckets.{BUCKET}.references[0].format: 'url' is not one of key, uri, bucket_key",
        f"buckets.{BUCKET}.references[1].query: 'query' must be a SELECT statement",
        f"buckets.{BUCKET}.enabled: expected a bool (true or false), got 'yes'",
        f"buckets.{BUCKET}.batch_size: 0 is out of range; use 1..1000",
        f"buckets.{BUCKET}: unknown key(s) colour, shade; allowed: batch_size, companions, description, "
        f"drift_error_keys, enabled, full_listing_every, min_age, min_age_days, noncurrent_min_age, quarantine, "
        f"references",
        "buckets.Second_Bucket: 'Second_Bucket' is not a valid S3 bucket name",
        "buckets.Second_Bucket.min_age: a minimum age of 12h is below one day",
        "buckets.Second_Bucket.references: no reference sources",
        "buckets.third-bucket: expected a mapping, got str",
        "manifest_retention_days: must be at least 1, got 0",
    ]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}: {start}"), line


def test_two_buckets_each_name_their_own_problem(tmp_path: Path) -> None:
    document = valid_document()
    document["buckets"]["other-bucket"] = copy.deepcopy(bucket_of(document))
    bucket_of(document)["batch_size"] = 1001
    document["buckets"]["other-bucket"]["companions"][0]["companion"] = r"\2.json"
    path = write(tmp_path, document)
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert str(raised.value).splitlines() == [
        f"{path}: buckets.{BUCKET}.batch_size: 1001 is out of range; use 1..1000 (the S3 DeleteObjects limit)",
        f"{path}: buckets.other-bucket.companions[0].companion: refers to a group that 'match' does not have",
    ]


@pytest.mark.parametrize(
    ("document_key", "parent", "allowed"),
    [("source", "", "allow_short_min_age, buckets, capacity_bytes, manifest_retention_days"),
     ("name", f"buckets.{BUCKET}: ", "batch_size, companions")],
)
def test_keys_the_file_does_not_spell_are_unknown(
    tmp_path: Path, document_key: str, parent: str, allowed: str
) -> None:
    """The policy's source and a bucket's name come from the file's path and mapping keys, not from settings."""
    document = valid_document()
    (document if document_key == "source" else bucket_of(document))[document_key] = "elsewhere"
    path = write(tmp_path, document)
    message = f"{path}: {parent}unknown key(s) {document_key}; allowed: {allowed}"
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(path)


@pytest.mark.parametrize(
    ("duration", "text"),
    [(timedelta(days=30), "30d"), (timedelta(hours=12), "12h"), (timedelta(days=1, hours=6), "1d 6h"),
     (timedelta(seconds=90), "1m 30s"), (timedelta(seconds=45), "45s"), (timedelta(minutes=10), "10m"),
     (timedelta(seconds=1.5), "1.5s"), (timedelta(0), "0s")],
)
def test_format_duration(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text
    if " " not in text:
        assert parse_duration(text, "here") == duration


def test_policies_built_in_code_are_checked_values() -> None:
    """Objects built in code (tests, benchmarks) get the type, query and regex checks; equal ones hash alike."""
    source = ReferenceSource(name="s", query="SELECT path FROM app.files;")
    assert source.query == "SELECT path FROM app.files"
    assert source == ReferenceSource("s", "SELECT path FROM app.files")
    assert {source: 1}[ReferenceSource(name="s", query="SELECT path FROM app.files")] == 1
    bucket = BucketPolicy(name="b", min_age=timedelta(hours=1), references=(source,))  # file-only rules off
    assert (bucket.enabled, bucket.batch_size, bucket.companions) == (True, DELETE_OBJECTS_LIMIT, ())
    with pytest.raises(ValueError, match="read-only"):
        ReferenceSource(name="s", query="DELETE FROM app.files")
    with pytest.raises(ValueError, match="RE2"):
        CompanionRule("look-ahead", r"^(?=x)(.+)$", r"\1")
    with pytest.raises(ValueError, match="batch_size"):
        BucketPolicy(name="b", min_age=timedelta(days=1), references=(source,), batch_size=True)


def test_the_shipped_policy_points_only_at_files_of_the_repository() -> None:
    """Its comments name where the schema and the fields are explained; each must exist."""
    repo = default_policy_path().resolve().parents[2]
    named = re.findall(r"[\w./-]+\.(?:py|md|yaml)\b", default_policy_path().read_text())
    assert named, "the shipped policy names no document"
    for path in named:
        target = (repo / path).resolve()
        assert target.is_relative_to(repo) and target.is_file(), f"the shipped policy points at {path}, outside " \
                                                                 f"the repository or missing"


@pytest.mark.parametrize(("quarantine", "message"), [
    ({"bucket": BUCKET, "keep_days": 7}, f"quarantine.bucket {BUCKET!r} is a bucket of this policy"),
    ({"bucket": "second-bucket", "keep_days": 7}, "quarantine.bucket 'second-bucket' is a bucket of this policy"),
    ({"prefix": "", "keep_days": 7}, "'prefix' must name a folder"),
    ({"prefix": "/", "keep_days": 7}, "'prefix' must name a folder"),
])
def test_a_quarantine_that_would_expire_a_cleaned_bucket_is_refused(quarantine: dict[str, Any], message: str):
    document = valid_document()
    document["buckets"]["second-bucket"] = copy.deepcopy(document["buckets"][BUCKET])
    document["buckets"][BUCKET]["quarantine"] = quarantine
    with pytest.raises(PolicyError, match=re.escape(message)):
        parse_policy(document, "p.yaml")
    document["buckets"][BUCKET]["quarantine"] = {"bucket": "heimdall-quarantine", "keep_days": 7}
    assert parse_policy(document, "p.yaml").bucket(BUCKET).quarantine.bucket == "heimdall-quarantine"
