"""The storage policy: which buckets are cleaned, how old an orphan must be, what references them.

Loaded from YAML and validated up front by the pydantic dataclasses below, so that a typo is an
error naming the file, the bucket and the field, never a silently different cleanup. Every problem
of a file is reported at once, one line each.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, ErrorDetails

from heimdall_storage_pipeline.core.companions import NotInvertibleError, check_invertible
from heimdall_storage_pipeline.core.keys import ReferenceFormat

POLICY_ENV_VAR = "HEIMDALL_STORAGE_POLICY"
DELETE_OBJECTS_LIMIT = 1000  # S3 DeleteObjects accepts at most 1000 keys per request
DEFAULT_MANIFEST_RETENTION_DAYS = 14
# Longest a reference query may run on the server (scan read or re-check) before it is cancelled.
DEFAULT_STATEMENT_TIMEOUT = timedelta(minutes=10)
# An event-maintained inventory is checked against a full listing at least this often.
DEFAULT_FULL_LISTING_EVERY = timedelta(days=1)
DEFAULT_DRIFT_ERROR_KEYS = 100

# S3 bucket naming rules (3-63 chars, lowercase letters, digits, dots and hyphens).
_BUCKET_NAME = re.compile(r"^(?!xn--)(?!.*\.\.)(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhms])\s*$")
_DURATION_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b)\s*$", re.IGNORECASE)
# First keyword of a read-only statement; anything else is refused.
_SELECT_START = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)
_WRITE_KEYWORDS = re.compile(
    r"\b(insert|update|delete|merge|drop|alter|create|truncate|grant|revoke|copy|call|do|"
    r"vacuum|lock|set|reset|refresh|comment|security|into)\b",
    re.IGNORECASE,
)
_ROW_LOCKS = re.compile(r"\bfor\s+(?:no\s+key\s+update|update|key\s+share|share)\b", re.IGNORECASE)
_SQL_STRINGS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_SQL_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


class PolicyError(ValueError):
    """An invalid policy file; each line of the message names the file, bucket and field of one problem."""


# --- Value checks: each raises ValueError with the problem and its fix; the field is added by the caller.


def _duration(value: Any) -> timedelta:
    if isinstance(value, int | float) and not isinstance(value, bool):
        amount, unit = value, "d"
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        amount, unit = float(match.group(1)), match.group(2)
    else:
        raise ValueError(f"expected a duration like '30d', '12h' or '90s', got {value!r}")
    if amount < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    try:
        return timedelta(**{_DURATION_UNITS[unit]: amount})
    except (OverflowError, ValueError):  # infinite, NaN, or more than timedelta's 999,999,999 days
        raise ValueError(f"{value!r} is out of range") from None


def parse_duration(value: Any, where: str) -> timedelta:
    """Parse ``30d``, ``12h``, ``15m``, ``90s`` or a bare number of days."""
    try:
        return _duration(value)
    except ValueError as exc:
        raise PolicyError(f"{where}: {exc}") from None


def format_duration(duration: timedelta) -> str:
    """``30d``, ``12h``, ``1d 6h``, ``1m 30s``: the units ``parse_duration`` reads, largest first."""
    days, seconds = duration.days, duration.seconds + duration.microseconds / 1e6
    parts = [f"{days}d"] if days else []
    for unit, size in (("h", 3600), ("m", 60)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{int(count)}{unit}")
    if seconds or not parts:
        parts.append(f"{seconds:g}s")
    return " ".join(parts)


def _read_only_query(query: str) -> str:
    if not query.strip():
        raise ValueError("'query' must be a non-empty SQL SELECT statement")
    bare = _SQL_COMMENTS.sub(" ", _SQL_STRINGS.sub("''", query)).strip().rstrip(";").strip()
    if ";" in bare:
        raise ValueError("'query' must be a single statement; remove the extra ';'")
    if not _SELECT_START.match(bare):
        raise ValueError(f"'query' must be a SELECT statement (read-only), got {query.strip()[:60]!r}")
    write = _WRITE_KEYWORDS.search(bare)
    if write:
        raise ValueError(f"'query' must be read-only; it contains {write.group(1).upper()!r}")
    locking = _ROW_LOCKS.search(bare)
    if locking:
        raise ValueError(f"'query' must not lock rows ({' '.join(locking.group(0).upper().split())}), which a "
                         f"read-only snapshot refuses; remove the locking clause")
    import sqlalchemy as sa  # here: validating a policy is the only use, and the diff's process needs no driver

    # Some reads run the query through SQLAlchemy's text() and the COPY read sends it as written:
    # text() must leave it unchanged, or the re-check before a delete would read other rows.
    parsed = sa.text(query)
    binds = sorted(parsed.compile().params)
    if binds:
        raise ValueError(
            f"'query' contains ':{binds[0]}', which is read as a bind parameter (even inside "
            f"a string literal) and nothing supplies it; write a literal colon as chr(58)"
        )
    if str(parsed) != query:
        raise ValueError(
            "'query' contains '\\:', which some reads rewrite to ':' and others send as "
            "written; write a backslash and a colon as chr(92) || chr(58), or the colon alone"
        )
    return query.strip().rstrip(";").rstrip()


def _one_of(*allowed: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return BeforeValidator(check)


def _statement_timeout(value: Any) -> timedelta:
    timeout = value if isinstance(value, timedelta) else _duration(value)
    if not timedelta(seconds=1) <= timeout <= timedelta(days=1):
        raise ValueError(f"{format_duration(timeout)} is out of range; use 1s..1d, e.g. '10m'")
    return timeout


def _regex_for_python_and_re2(match: str) -> str:
    try:
        re.compile(match)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    # The diff applies the rule with RE2 (Arrow), which lacks some of Python's syntax
    # (look-arounds, backreferences): check it there too, not only with ``re``.
    try:
        pc.replace_substring_regex(pa.array([""], pa.string()), match, "")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"not a valid RE2 regular expression (as the diff uses): {exc}") from None
    return match


def _groups_of_match(companion: str, info: ValidationInfo) -> str:
    match = info.data.get("match")
    if match is None:  # 'match' is invalid and reported already
        return companion
    groups = {int(group) for group in re.findall(r"\\(\d)", companion)}
    if any(group > re.compile(match).groups for group in groups):
        raise ValueError("refers to a group that 'match' does not have")
    try:
        pc.replace_substring_regex(pa.array([""], pa.string()), match, companion)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"not a valid RE2 replacement (as the diff uses): {exc}") from None
    try:
        check_invertible(match, companion)
    except NotInvertibleError as exc:
        raise ValueError(
            f"the rule must tell a companion's owner, so that a deletion can re-check it: {exc} (write it as "
            f"'^literal(group)literal$', e.g. '^(.+)\\.npy$' with companion '\\1_metadata.json')"
        ) from None
    return companion


def _from_document(info: ValidationInfo) -> bool:
    """S3 names, some sources and a minimum age of a day are rules of a policy file, not of objects built in code."""
    return info.context is not None


@dataclasses.dataclass(frozen=True)
class _InDays:
    """A ``min_age_days`` value on its way to ``min_age``; its errors name ``min_age_days``."""

    days: Any


_MIN_AGE_TWICE = object()  # both 'min_age_days' and 'min_age' were given


def _min_age(value: Any, info: ValidationInfo) -> timedelta:
    if value is _MIN_AGE_TWICE:
        raise ValueError("give either 'min_age_days' or 'min_age', not both")
    if isinstance(value, _InDays):
        if isinstance(value.days, bool) or not isinstance(value.days, int | float):
            raise ValueError(f"expected a number of days, got {value.days!r}")
        min_age = _duration(value.days)
    else:
        min_age = value if isinstance(value, timedelta) else _duration(value)
    if min_age < timedelta(days=1) and _from_document(info) and not info.context.get("allow_short_min_age"):
        raise ValueError(
            f"a minimum age of {format_duration(min_age)} is below one day, which would make fresh "
            f"uploads deletable; set 'allow_short_min_age: true' at the top of the policy "
            f"if this is intended (tests, demos)"
        )
    return min_age


def _full_listing_every(value: Any) -> timedelta:
    every = value if isinstance(value, timedelta) else _duration(value)
    if every < timedelta(minutes=1):
        raise ValueError(f"{format_duration(every)} is too short; use at least 1m, e.g. '1d'")
    return every


def _not_negative(count: int) -> int:
    if count < 0:
        raise ValueError(f"must not be negative, got {count}")
    return count


def _batch_size(size: int) -> int:
    if not 1 <= size <= DELETE_OBJECTS_LIMIT:
        raise ValueError(f"{size} is out of range; use 1..{DELETE_OBJECTS_LIMIT} (the S3 DeleteObjects limit)")
    return size


def _bucket_name(name: Any, info: ValidationInfo) -> str:
    if not isinstance(name, str) or (_from_document(info) and not _BUCKET_NAME.match(name)):
        raise ValueError(
            f"{name!r} is not a valid S3 bucket name (3-63 characters: lowercase letters, digits, '.' and '-')"
        )
    return name


def _named_rules(rules: Any, default_name: Callable[[int, dict[str, Any]], Any]) -> Any:
    """Sources or companions as the file gives them; one without a 'name' gets ``default_name``."""
    if not isinstance(rules, list):
        return rules
    named = []
    for index, rule in enumerate(rules):
        if isinstance(rule, dict):
            rule = {str(key): value for key, value in rule.items()}
            rule.setdefault("name", default_name(index, rule))
        named.append(rule)
    return named


def _sources_by_position(sources: Any) -> Any:
    return _named_rules(sources, lambda index, _: f"references[{index}]")


def _companions_by_match(rules: Any) -> Any:
    return () if rules is None else _named_rules(rules, lambda _, rule: str(rule.get("match", "")))


def _some_unique_sources(sources: tuple[ReferenceSource, ...], info: ValidationInfo) -> tuple[ReferenceSource, ...]:
    if not sources and _from_document(info):
        raise ValueError(
            "no reference sources; every bucket needs at least one query naming the objects that are in use"
        )
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    return sources


def _size(value: Any) -> int:
    """Bytes, or a size with a unit: ``466 GiB`` (powers of 1024), ``500 GB`` (powers of 1000)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = match.group(2).lower()
        base = 1024 if "i" in unit else 1000
        size = int(float(match.group(1)) * base ** "bkmgtp".index(unit[0]))
    else:
        raise ValueError(f"expected a number of bytes or a size like '466 GiB' or '500 GB', got {value!r}")
    if size < 1:
        raise ValueError(f"must be positive, got {value!r}")
    return size


def _at_least_one(days: int) -> int:
    if days < 1:
        raise ValueError(f"must be at least 1, got {days}")
    return days


def _bucket_arguments(name: Any, settings: Any) -> Any:
    """A bucket as the file spells it (settings under its name) as arguments of ``BucketPolicy``."""
    if not isinstance(settings, dict):
        return settings
    kwargs = {str(key): value for key, value in settings.items()}
    if "min_age_days" in kwargs:
        days = kwargs.pop("min_age_days")
        kwargs["min_age"] = _MIN_AGE_TWICE if "min_age" in kwargs else _InDays(days)
    return ArgsKwargs((name,), kwargs)


def _buckets_from_mapping(buckets: Any) -> Any:
    if isinstance(buckets, tuple):
        return buckets
    if not isinstance(buckets, dict) or not buckets:
        raise ValueError("must be a non-empty mapping of bucket name to settings")
    return [_bucket_arguments(name, settings) for name, settings in buckets.items()]


# --- The policy. New settings are new fields here (with a check above if a type is not enough).

_NO_UNKNOWN_KEYS = ConfigDict(extra="forbid")  # and Strict* scalars: a YAML "yes" is no bool, a bool no int


@dataclass(frozen=True, config=_NO_UNKNOWN_KEYS)
class ReferenceSource:
    """A read-only query whose first column's values reference objects of the bucket."""

    name: StrictStr
    query: Annotated[StrictStr, AfterValidator(_read_only_query)]
    format: Annotated[ReferenceFormat, _one_of(*ReferenceFormat)] = ReferenceFormat.KEY
    container: Annotated[StrictStr, _one_of("none", "json")] = "none"
    percent_decode: StrictBool = False
    statement_timeout: Annotated[timedelta, BeforeValidator(_statement_timeout)] = DEFAULT_STATEMENT_TIMEOUT


@dataclass(frozen=True, config=_NO_UNKNOWN_KEYS)
class CompanionRule:
    """Keeps objects derived from a referenced key, e.g. a sidecar next to a ``.npy``.

    ``match`` is a regular expression over the referenced key (valid for Python and RE2);
    ``companion`` its replacement with ``\\1``-style group references.
    """

    name: StrictStr
    match: Annotated[StrictStr, AfterValidator(_regex_for_python_and_re2)]
    companion: Annotated[StrictStr, AfterValidator(_groups_of_match)]


def _optional_min_age(value: Any, info: ValidationInfo) -> timedelta | None:
    return None if value is None else _min_age(value, info)


def _one_place(quarantine: Quarantine) -> Quarantine:
    if (quarantine.bucket is None) == (quarantine.prefix is None):
        raise ValueError("give either 'bucket' (a quarantine bucket) or 'prefix' (in the same bucket), not both "
                         "and not neither, e.g. {prefix: 'heimdall-quarantine/', keep_days: 30}")
    if quarantine.prefix is not None and not quarantine.prefix.strip("/"):
        raise ValueError("'prefix' must name a folder, e.g. 'heimdall-quarantine/'")
    return quarantine


@dataclass(frozen=True, config=_NO_UNKNOWN_KEYS)
class Quarantine:
    """Where a live cleanup moves objects instead of deleting them, and for how long they stay."""

    keep_days: Annotated[StrictInt, AfterValidator(_at_least_one)]
    bucket: Annotated[str | None, BeforeValidator(lambda name, info: name if name is None else
                                                  _bucket_name(name, info))] = None
    prefix: StrictStr | None = None

    def root(self, bucket: str) -> tuple[str, str]:
        """The quarantine bucket and the prefix (ending in '/') under which ``bucket``'s moves go."""
        if self.bucket is not None:
            return self.bucket, f"{bucket}/"
        return bucket, f"{self.prefix.rstrip('/')}/"  # type: ignore[union-attr]

    def location(self, bucket: str, key: str, move: str) -> tuple[str, str]:
        """The quarantine bucket and key of ``bucket``'s object ``key`` moved by ``move`` (a move id):
        ``<root>/<move>/<key>``, the original key kept whole, so that no move overwrites another's copy."""
        where, prefix = self.root(bucket)
        return where, f"{prefix}{move}/{key}"


@dataclass(frozen=True, config=_NO_UNKNOWN_KEYS)
class BucketPolicy:
    """One bucket's settings; in the file, the bucket's name is its key under ``buckets:``."""

    name: Annotated[str, BeforeValidator(_bucket_name)]
    # The file may give it as 'min_age_days: 30' (a number of days) or 'min_age: 30d'.
    min_age: Annotated[timedelta, BeforeValidator(_min_age)]
    references: Annotated[
        tuple[ReferenceSource, ...], BeforeValidator(_sources_by_position), AfterValidator(_some_unique_sources)
    ]
    enabled: StrictBool = True
    batch_size: Annotated[StrictInt, AfterValidator(_batch_size)] = DELETE_OBJECTS_LIMIT
    description: StrictStr = ""
    companions: Annotated[tuple[CompanionRule, ...], BeforeValidator(_companions_by_match)] = ()
    full_listing_every: Annotated[timedelta, BeforeValidator(_full_listing_every)] = DEFAULT_FULL_LISTING_EVERY
    # Keys an event-maintained inventory and a full listing may disagree on before the check is an ERROR.
    drift_error_keys: Annotated[StrictInt, AfterValidator(_not_negative)] = DEFAULT_DRIFT_ERROR_KEYS
    # Versioned buckets: noncurrent versions this long noncurrent are deleted; None keeps them all.
    noncurrent_min_age: Annotated[timedelta | None, BeforeValidator(_optional_min_age)] = None
    quarantine: Annotated[Quarantine | None, AfterValidator(lambda q: q if q is None else _one_place(q))] = None


def _quarantine_elsewhere(buckets: tuple[BucketPolicy, ...]) -> tuple[BucketPolicy, ...]:
    # The expiry and lifecycle rule delete under the quarantine location: never a cleaned bucket's data.
    names = {bucket.name for bucket in buckets}
    for bucket in buckets:
        if bucket.quarantine is not None and bucket.quarantine.bucket in names:
            raise ValueError(
                f"{bucket.name}: quarantine.bucket {bucket.quarantine.bucket!r} is a bucket of this policy, whose "
                f"data its expiry would delete; name a bucket of its own, or use 'prefix' in the same bucket"
            )
    return buckets


@dataclass(frozen=True, config=_NO_UNKNOWN_KEYS)
class StoragePolicy:
    source: str  # where the policy came from, for error messages
    buckets: Annotated[tuple[BucketPolicy, ...], BeforeValidator(_buckets_from_mapping),
                       AfterValidator(_quarantine_elsewhere)]
    manifest_retention_days: Annotated[StrictInt, AfterValidator(_at_least_one)] = DEFAULT_MANIFEST_RETENTION_DAYS
    allow_short_min_age: StrictBool = False
    # The disk that holds the buckets, for the days-until-full forecast; none: no forecast.
    capacity_bytes: Annotated[int | None, BeforeValidator(_size)] = None

    def enabled_buckets(self) -> list[BucketPolicy]:
        return [bucket for bucket in self.buckets if bucket.enabled]

    def bucket(self, name: str) -> BucketPolicy:
        for bucket in self.buckets:
            if bucket.name == name:
                return bucket
        known = ", ".join(sorted(bucket.name for bucket in self.buckets)) or "none"
        raise PolicyError(
            f"{self.source}: bucket {name!r} is not in the policy (known buckets: {known}); "
            f"add it under 'buckets:' or pick one of those"
        )


_POLICY = TypeAdapter(StoragePolicy)


# --- Error messages: pydantic's errors as '<file>: buckets.<bucket>.<field>: <problem and fix>'.

_MISSING = {
    "buckets": "missing 'buckets' (a non-empty mapping of bucket name to settings)",
    "min_age": "missing 'min_age_days' (or 'min_age' as a duration like '30d')",
    "references": "missing 'references'; every bucket needs at least one query naming the objects that are in use",
    "query": "missing 'query' (a SELECT whose first column holds the references)",
}
_EXPECTED = {
    "string_type": "a string",
    "bool_type": "a bool (true or false)",
    "int_type": "an integer",
    "tuple_type": "a list",
    "dataclass_type": "a mapping",
}
_UNKNOWN_KEY = {"unexpected_keyword_argument", "multiple_argument_values", "extra_forbidden"}


def _document_keys(parent: tuple[int | str, ...]) -> str:
    """The keys the file may use where ``parent`` points."""
    named = [part for part in parent if isinstance(part, str)]
    model = {"buckets": BucketPolicy, "references": ReferenceSource, "companions": CompanionRule,
             "quarantine": Quarantine}.get(
        named[-1] if named else "", StoragePolicy
    )
    keys = {field.name for field in dataclasses.fields(model)}
    if model is StoragePolicy:
        keys.remove("source")
    if model is BucketPolicy:
        keys = keys - {"name"} | {"min_age_days"}
    return ", ".join(sorted(keys))


def _where(loc: tuple[int | str, ...], bucket_names: list[Any]) -> str:
    where = ""
    for previous, part in zip((None, *loc), loc, strict=False):
        if isinstance(part, str):
            where += f".{part}" if where else part
        elif previous == "buckets" and part < len(bucket_names):
            where += f".{bucket_names[part]}"
        elif previous in ("references", "companions", "buckets"):
            where += f"[{part}]"
        # any other index is a bucket's name, passed as BucketPolicy's first argument: named already
    return where


def _problem(error: ErrorDetails) -> str:
    kind, value = error["type"], error["input"]
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind in _EXPECTED:
        got = type(value).__name__ if kind in ("dataclass_type", "tuple_type") else repr(value)
        return f"expected {_EXPECTED[kind]}, got {got}"
    return error["msg"]


def _problems(error: ValidationError, document: dict[Any, Any]) -> list[str]:
    """One line per problem, as '<where>: <problem>'; the unknown keys of one mapping share a line."""
    buckets = document.get("buckets")
    names = list(buckets) if isinstance(buckets, dict) else []
    problems: list[tuple[tuple[int | str, ...], str | list[str]]] = []  # a list: unknown keys of that mapping
    unknown: dict[tuple[int | str, ...], list[str]] = {}
    for detail in error.errors(include_url=False):
        loc, kind = detail["loc"], detail["type"]
        if kind in _UNKNOWN_KEY:
            if loc[:-1] not in unknown:
                unknown[loc[:-1]] = []
                problems.append((loc[:-1], unknown[loc[:-1]]))
            unknown[loc[:-1]].append(str(loc[-1]))
        elif kind == "missing":
            problems.append((loc[:-1], _MISSING.get(str(loc[-1]), f"missing {loc[-1]!r}")))
        elif isinstance(detail["input"], _InDays):
            problems.append(((*loc[:-1], "min_age_days"), _problem(detail)))
        else:
            problems.append((loc, _problem(detail)))
    lines = []
    for loc, problem in problems:
        text = problem if isinstance(problem, str) else (
            f"unknown key(s) {', '.join(sorted(problem))}; allowed: {_document_keys(loc)}"
        )
        where = _where(loc, names)
        lines.append(f"{where}: {text}" if where else text)
    return lines


def parse_policy(document: Any, source: str) -> StoragePolicy:
    """Validate a loaded YAML document; a PolicyError lists every problem, one line each."""
    if not isinstance(document, dict):
        raise PolicyError(f"{source}: expected a mapping, got {type(document).__name__}")
    kwargs = {str(key): value for key, value in document.items()}
    context = {"allow_short_min_age": kwargs.get("allow_short_min_age") is True}
    try:
        return _POLICY.validate_python(ArgsKwargs((source,), kwargs), context=context)
    except ValidationError as exc:
        raise PolicyError("\n".join(f"{source}: {line}" for line in _problems(exc, document))) from None


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
