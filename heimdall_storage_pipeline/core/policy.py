"""The storage policy: which buckets are cleaned, how old an orphan must be, what references them.

Loaded from YAML and validated up front, so that a typo is an error naming the file, the
bucket and the field, never a silently different cleanup.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
import yaml

from heimdall_storage_pipeline.core.companions import NotInvertibleError, check_invertible
from heimdall_storage_pipeline.core.keys import ReferenceFormat

POLICY_ENV_VAR = "HEIMDALL_STORAGE_POLICY"
DELETE_OBJECTS_LIMIT = 1000  # S3 DeleteObjects accepts at most 1000 keys per request
DEFAULT_MANIFEST_RETENTION_DAYS = 14
# Longest a reference query may run on the server (scan read or re-check) before it is cancelled.
DEFAULT_STATEMENT_TIMEOUT = timedelta(minutes=10)

# S3 bucket naming rules (3-63 chars, lowercase letters, digits, dots and hyphens).
_BUCKET_NAME = re.compile(r"^(?!xn--)(?!.*\.\.)(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhms])\s*$")
_DURATION_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
# First keyword of a read-only statement; anything else is refused.
_SELECT_START = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)
_WRITE_KEYWORDS = re.compile(
    r"\b(insert|update|delete|merge|drop|alter|create|truncate|grant|revoke|copy|call|do|"
    r"vacuum|lock|set|reset|refresh|comment|security|into)\b",
    re.IGNORECASE,
)
_SQL_STRINGS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_SQL_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


class PolicyError(ValueError):
    """An invalid policy file; the message names the file, bucket and field."""


@dataclass(frozen=True)
class ReferenceSource:
    """A read-only query whose first column's values reference objects of the bucket."""

    name: str
    query: str
    format: ReferenceFormat = ReferenceFormat.KEY
    container: str = "none"  # "none" or "json"
    percent_decode: bool = False
    statement_timeout: timedelta = DEFAULT_STATEMENT_TIMEOUT


@dataclass(frozen=True)
class CompanionRule:
    """Keeps objects derived from a referenced key, e.g. a sidecar next to a ``.npy``.

    ``match`` is a regular expression over the referenced key (RE2 syntax, as used by
    Arrow); ``companion`` its replacement with ``\\1``-style group references.
    """

    name: str
    match: str
    companion: str


@dataclass(frozen=True)
class BucketPolicy:
    name: str
    enabled: bool
    min_age: timedelta
    batch_size: int
    description: str
    references: tuple[ReferenceSource, ...]
    companions: tuple[CompanionRule, ...] = ()


@dataclass(frozen=True)
class StoragePolicy:
    source: str  # where the policy came from, for error messages
    buckets: tuple[BucketPolicy, ...]
    manifest_retention_days: int = DEFAULT_MANIFEST_RETENTION_DAYS
    allow_short_min_age: bool = False
    _by_name: dict[str, BucketPolicy] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({bucket.name: bucket for bucket in self.buckets})

    def enabled_buckets(self) -> list[BucketPolicy]:
        return [bucket for bucket in self.buckets if bucket.enabled]

    def bucket(self, name: str) -> BucketPolicy:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise PolicyError(
                f"{self.source}: bucket {name!r} is not in the policy (known buckets: {known}); "
                f"add it under 'buckets:' or pick one of those"
            ) from None


def parse_duration(value: Any, where: str) -> timedelta:
    """Parse ``30d``, ``12h``, ``15m``, ``90s`` or a bare number of days."""
    if isinstance(value, bool):
        raise PolicyError(f"{where}: expected a duration like '30d', '12h' or '90s', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise PolicyError(f"{where}: must not be negative, got {value!r}")
        return timedelta(days=value)
    match = _DURATION.match(str(value))
    if not match:
        raise PolicyError(f"{where}: expected a duration like '30d', '12h' or '90s', got {value!r}")
    return timedelta(**{_DURATION_UNITS[match.group(2)]: float(match.group(1))})


def check_read_only_query(query: str, where: str) -> str:
    """Refuse anything but a single SELECT (or WITH ... SELECT) statement."""
    if not isinstance(query, str) or not query.strip():
        raise PolicyError(f"{where}: 'query' must be a non-empty SQL SELECT statement")
    bare = _SQL_COMMENTS.sub(" ", _SQL_STRINGS.sub("''", query)).strip().rstrip(";").strip()
    if ";" in bare:
        raise PolicyError(f"{where}: 'query' must be a single statement; remove the extra ';'")
    if not _SELECT_START.match(bare):
        raise PolicyError(f"{where}: 'query' must be a SELECT statement (read-only), got {query.strip()[:60]!r}")
    write = _WRITE_KEYWORDS.search(bare)
    if write:
        raise PolicyError(
            f"{where}: 'query' must be read-only; it contains {write.group(1).upper()!r}"
        )
    # Some reads run the query through SQLAlchemy's text() and the COPY read sends it as written:
    # text() must leave it unchanged, or the re-check before a delete would read other rows.
    parsed = sa.text(query)
    binds = sorted(parsed.compile().params)
    if binds:
        raise PolicyError(
            f"{where}: 'query' contains ':{binds[0]}', which is read as a bind parameter (even inside "
            f"a string literal) and nothing supplies it; write a literal colon as chr(58)"
        )
    if str(parsed) != query:
        raise PolicyError(
            f"{where}: 'query' contains '\\:', which some reads rewrite to ':' and others send as "
            f"written; write a backslash and a colon as chr(92) || chr(58), or the colon alone"
        )
    return query.strip().rstrip(";").rstrip()


_ROOT_KEYS = {"buckets", "manifest_retention_days", "allow_short_min_age"}
_BUCKET_KEYS = {
    "enabled", "min_age_days", "min_age", "batch_size", "description", "references", "companions",
}
_SOURCE_KEYS = {"name", "query", "format", "container", "percent_decode", "statement_timeout"}
_COMPANION_KEYS = {"name", "match", "companion"}


def _check_keys(mapping: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise PolicyError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(map(str, mapping)) - allowed)
    if unknown:
        raise PolicyError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return mapping


def _typed(mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    value = mapping.get(key, default)
    # bool is an int subclass; a YAML 'yes' must not pass as a batch size.
    if isinstance(value, bool) and kind is int:
        raise PolicyError(f"{where}.{key}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise PolicyError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _parse_source(raw: Any, where: str) -> ReferenceSource:
    data = _check_keys(raw, _SOURCE_KEYS, where)
    if "query" not in data:
        raise PolicyError(f"{where}: missing 'query' (a SELECT whose first column holds the references)")
    fmt_name = _typed(data, "format", str, where, "key")
    try:
        fmt = ReferenceFormat(fmt_name)
    except ValueError:
        allowed = ", ".join(f.value for f in ReferenceFormat)
        raise PolicyError(f"{where}.format: {fmt_name!r} is not one of {allowed}") from None
    container = _typed(data, "container", str, where, "none")
    if container not in ("none", "json"):
        raise PolicyError(f"{where}.container: {container!r} is not one of none, json")
    query = _typed(data, "query", str, where, "")
    timeout = parse_duration(data.get("statement_timeout", "10m"), f"{where}.statement_timeout")
    if not timedelta(seconds=1) <= timeout <= timedelta(days=1):
        raise PolicyError(f"{where}.statement_timeout: {timeout} is out of range; use 1s..1d, e.g. '10m'")
    return ReferenceSource(
        name=_typed(data, "name", str, where, where.rsplit(".", 1)[-1]),
        query=check_read_only_query(query, f"{where}.query"),
        format=fmt,
        container=container,
        percent_decode=_typed(data, "percent_decode", bool, where, False),
        statement_timeout=timeout,
    )


def _parse_companion(raw: Any, where: str) -> CompanionRule:
    data = _check_keys(raw, _COMPANION_KEYS, where)
    for key in ("match", "companion"):
        if key not in data:
            raise PolicyError(f"{where}: missing {key!r}")
    match = _typed(data, "match", str, where, "")
    try:
        pattern = re.compile(match)
    except re.error as exc:
        raise PolicyError(f"{where}.match: invalid regular expression: {exc}") from None
    companion = _typed(data, "companion", str, where, "")
    groups = {int(g) for g in re.findall(r"\\(\d)", companion)}
    if any(g > pattern.groups for g in groups):
        raise PolicyError(f"{where}.companion: refers to a group that 'match' does not have")
    # The diff applies the rule with Arrow's RE2, which lacks some of Python's syntax
    # (look-arounds, backreferences): check it there too, not only with ``re``.
    try:
        pc.replace_substring_regex(pa.array([""], pa.string()), match, companion)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise PolicyError(
            f"{where}.match: not a valid RE2 regular expression (as the diff uses): {exc}"
        ) from None
    try:
        check_invertible(match, companion)
    except NotInvertibleError as exc:
        raise PolicyError(
            f"{where}: the rule must tell a companion's owner, so that a deletion can re-check it: {exc} "
            f"(write it as '^literal(group)literal$', e.g. '^(.+)\\.npy$' with companion '\\1_metadata.json')"
        ) from None
    return CompanionRule(name=_typed(data, "name", str, where, match), match=match, companion=companion)


def _parse_bucket(name: Any, raw: Any, where: str, allow_short: bool) -> BucketPolicy:
    if not isinstance(name, str) or not _BUCKET_NAME.match(name):
        raise PolicyError(
            f"{where}: {name!r} is not a valid S3 bucket name "
            f"(3-63 characters: lowercase letters, digits, '.' and '-')"
        )
    data = _check_keys(raw, _BUCKET_KEYS, where)
    if "min_age_days" in data and "min_age" in data:
        raise PolicyError(f"{where}: give either 'min_age_days' or 'min_age', not both")
    if "min_age" in data:
        min_age = parse_duration(data["min_age"], f"{where}.min_age")
    elif "min_age_days" in data:
        days = _typed(data, "min_age_days", (int, float), where, 0)
        min_age = parse_duration(days, f"{where}.min_age_days")
    else:
        raise PolicyError(f"{where}: missing 'min_age_days' (or 'min_age' as a duration like '30d')")
    if min_age < timedelta(days=1) and not allow_short:
        raise PolicyError(
            f"{where}: a minimum age of {min_age} is below one day, which would make fresh "
            f"uploads deletable; set 'allow_short_min_age: true' at the top of the policy "
            f"if this is intended (tests, demos)"
        )
    batch_size = _typed(data, "batch_size", int, where, DELETE_OBJECTS_LIMIT)
    if not 1 <= batch_size <= DELETE_OBJECTS_LIMIT:
        raise PolicyError(
            f"{where}.batch_size: {batch_size} is out of range; use 1..{DELETE_OBJECTS_LIMIT} "
            f"(the S3 DeleteObjects limit)"
        )
    raw_sources = data.get("references")
    if not raw_sources:
        raise PolicyError(
            f"{where}.references: no reference sources; every bucket needs at least one "
            f"query naming the objects that are in use"
        )
    if not isinstance(raw_sources, list):
        raise PolicyError(f"{where}.references: expected a list of sources")
    sources = tuple(_parse_source(s, f"{where}.references[{i}]") for i, s in enumerate(raw_sources))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise PolicyError(f"{where}.references: source names must be unique, got {names}")
    raw_companions = data.get("companions") or []
    if not isinstance(raw_companions, list):
        raise PolicyError(f"{where}.companions: expected a list of rules")
    return BucketPolicy(
        name=name,
        enabled=_typed(data, "enabled", bool, where, True),
        min_age=min_age,
        batch_size=batch_size,
        description=_typed(data, "description", str, where, ""),
        references=sources,
        companions=tuple(
            _parse_companion(c, f"{where}.companions[{i}]") for i, c in enumerate(raw_companions)
        ),
    )


def parse_policy(document: Any, source: str) -> StoragePolicy:
    data = _check_keys(document, _ROOT_KEYS, source)
    allow_short = _typed(data, "allow_short_min_age", bool, source, False)
    retention = _typed(data, "manifest_retention_days", int, source, DEFAULT_MANIFEST_RETENTION_DAYS)
    if retention < 1:
        raise PolicyError(f"{source}.manifest_retention_days: must be at least 1, got {retention}")
    raw_buckets = data.get("buckets")
    if not isinstance(raw_buckets, dict) or not raw_buckets:
        raise PolicyError(f"{source}: 'buckets' must be a non-empty mapping of bucket name to settings")
    buckets = tuple(
        _parse_bucket(name, raw, f"{source}: buckets.{name}", allow_short)
        for name, raw in raw_buckets.items()
    )
    return StoragePolicy(
        source=source,
        buckets=buckets,
        manifest_retention_days=retention,
        allow_short_min_age=allow_short,
    )


def default_policy_path() -> Path:
    return Path(str(resources.files("heimdall_storage_pipeline") / "policies" / "heimdall.yaml"))


def policy_path_from_env() -> Path:
    return Path(os.environ.get(POLICY_ENV_VAR) or default_policy_path())


def load_policy(path: str | os.PathLike[str] | None = None) -> StoragePolicy:
    """Load and validate a policy file (default: ``$HEIMDALL_STORAGE_POLICY`` or the shipped one)."""
    policy_path = Path(path) if path else policy_path_from_env()
    try:
        text = policy_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(
            f"{policy_path}: policy file not found; set {POLICY_ENV_VAR} to an existing file"
        ) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{policy_path}: not valid YAML: {exc}") from None
    return parse_policy(document, str(policy_path))
