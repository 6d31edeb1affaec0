"""Object-key normalisation: the one place that turns stored values into comparable keys.

Rules (applied to listed keys and to database references alike):

1. A value may carry a location prefix, depending on the reference format:
   ``s3://bucket/key`` (``uri``), ``bucket/key`` (``bucket_key``) or nothing (``key``).
   The scheme and bucket are stripped; a different bucket is reported as such, never matched.
2. Leading ``/`` are stripped and runs of ``/`` collapse to one, as S3 servers such as
   SeaweedFS do when storing ``a//b`` (it becomes ``a/b``).
3. A ``.`` or ``..`` path segment, an empty key, a NUL or other control character makes
   the value unparseable. Unparseable values are counted and sampled; they protect
   nothing and are never deleted.
4. Percent-decoding: none by default, because ``%`` is a legal key character (``a%20b`` is
   a different object from ``a b``). A reference source may set ``percent_decode: true``
   when its application stores URL-encoded URIs; then ``%XX`` sequences of the key part
   are decoded (UTF-8) before rules 2 and 3, and a malformed sequence is unparseable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote

# Patterns of normalize_key, valid for Python and RE2 (the diff runs them in DuckDB).
CONTROL_PATTERN = r"[\x00-\x1f\x7f]"
SLASH_RUNS_PATTERN = r"/{2,}"
DOT_SEGMENT_PATTERN = r"(^|/)\.\.?(/|$)"
_SLASH_RUNS = re.compile(SLASH_RUNS_PATTERN)
_CONTROL_CHARS = re.compile(CONTROL_PATTERN)
_MALFORMED_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Keys matching this need the slow path; everything else is already normal.
NEEDS_NORMALISATION_PATTERN = r"^/|//|(^|/)\.\.?(/|$)|[\x00-\x1f\x7f]"


class ReferenceFormat(StrEnum):
    """How a reference source's values name objects."""

    KEY = "key"
    URI = "uri"
    BUCKET_KEY = "bucket_key"


def canonical_prefix(bucket: str, fmt: ReferenceFormat) -> str:
    """What precedes the key in a value's canonical spelling (one that normalisation leaves as is)."""
    return {ReferenceFormat.URI: f"s3://{bucket}/", ReferenceFormat.BUCKET_KEY: f"{bucket}/"}.get(fmt, "")


class InvalidKeyError(ValueError):
    """A value that cannot be turned into an object key."""


def normalize_key(raw: str) -> str:
    """Return the canonical form of an object key, or raise ``InvalidKeyError``."""
    if _CONTROL_CHARS.search(raw):
        raise InvalidKeyError("contains a control character")
    key = _SLASH_RUNS.sub("/", raw).lstrip("/")
    if not key:
        raise InvalidKeyError("empty key")
    if any(segment in (".", "..") for segment in key.split("/")):
        raise InvalidKeyError("contains a '.' or '..' path segment")
    return key


class ParsedKind(StrEnum):
    KEY = "key"
    OTHER_BUCKET = "other_bucket"
    UNPARSEABLE = "unparseable"


@dataclass(frozen=True)
class UndecodableValue:
    """A ``json`` container value that is not JSON: unparseable, never read as a key."""

    raw: str

    def __repr__(self) -> str:
        return repr(self.raw)


@dataclass(frozen=True)
class ParsedReference:
    kind: ParsedKind
    key: str = ""  # the normalised key when kind is KEY
    problem: str = ""  # why it is unparseable


def parse_reference(
    value: object,
    bucket: str,
    fmt: ReferenceFormat,
    *,
    percent_decode: bool = False,
) -> ParsedReference:
    """Turn one scalar reference value into a key of ``bucket``."""
    if isinstance(value, UndecodableValue):
        return ParsedReference(ParsedKind.UNPARSEABLE, problem="not valid JSON")
    if not isinstance(value, str):
        return ParsedReference(ParsedKind.UNPARSEABLE, problem=f"not a string: {type(value).__name__}")
    # Not stripped: S3 keys may begin or end with whitespace (SeaweedFS keeps 'a ' and ' a'),
    # and listed keys are not stripped either, so 'a ' must match 'a '.
    text = value
    if fmt is ReferenceFormat.URI:
        if not text.lower().startswith("s3://"):
            return ParsedReference(ParsedKind.UNPARSEABLE, problem="not an s3:// URI")
        ref_bucket, sep, raw_key = text[5:].partition("/")
        if not ref_bucket or not sep:
            return ParsedReference(ParsedKind.UNPARSEABLE, problem="URI without bucket or key")
    elif fmt is ReferenceFormat.BUCKET_KEY:
        ref_bucket, sep, raw_key = text.lstrip("/").partition("/")
        if not ref_bucket or not sep:
            return ParsedReference(ParsedKind.UNPARSEABLE, problem="expected bucket/key")
    else:
        ref_bucket, raw_key = bucket, text
    if ref_bucket != bucket:
        return ParsedReference(ParsedKind.OTHER_BUCKET)
    if percent_decode:
        if _MALFORMED_PERCENT.search(raw_key):
            return ParsedReference(ParsedKind.UNPARSEABLE, problem="malformed percent-encoding")
        try:
            raw_key = unquote(raw_key, errors="strict")
        except UnicodeDecodeError:
            return ParsedReference(ParsedKind.UNPARSEABLE, problem="percent-encoding is not UTF-8")
    try:
        return ParsedReference(ParsedKind.KEY, key=normalize_key(raw_key))
    except InvalidKeyError as exc:
        return ParsedReference(ParsedKind.UNPARSEABLE, problem=str(exc))


def expand_container(value: object, container: str) -> Iterator[object]:
    """Yield the scalar values inside a column value.

    ``container`` is ``none`` (the value itself) or ``json`` (a JSON object's values, an
    array's items, or a JSON string; psycopg2 already decodes ``jsonb`` to Python objects).
    A container that cannot be decoded yields the raw value so that it is reported as
    unparseable rather than silently dropped.
    """
    if container == "none":
        yield value
        return
    decoded = value
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            yield UndecodableValue(value)
            return
    if isinstance(decoded, dict):
        yield from decoded.values()
    elif isinstance(decoded, list):
        yield from decoded
    else:
        yield decoded
