"""Per-byte loops of the reference read, compiled (``_native.c``) when the build had a C compiler.

Without the extension every function here falls back to numpy/Arrow code with the same
results, only slower; ``NATIVE`` says which one runs (the benchmark prints it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

try:
    from heimdall_storage_pipeline.core import _native  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the numpy versions below
    _native = None

NATIVE = _native is not None


def _offsets_and_data(values: pa.Array) -> tuple[np.ndarray, pa.Buffer]:
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32, count=len(values) + 1, offset=values.offset * 4)
    return offsets, buffers[2] if buffers[2] is not None else pa.py_buffer(b"")


def split_rows(block: bytearray, rows_end: int) -> pa.Array:
    """The newline-ended rows of ``block[:rows_end]`` as a string array (bytes taken as UTF-8)."""
    if _native is not None:
        data = np.empty(rows_end, dtype=np.uint8)
        offsets = np.empty(rows_end + 1, dtype=np.int32)
        rows, length = _native.split_rows(block, rows_end, offsets, data)
        return pa.StringArray.from_buffers(rows, pa.py_buffer(offsets[: rows + 1]), pa.py_buffer(data[:length]))
    raw = np.frombuffer(block, dtype=np.uint8, count=rows_end)
    newline = raw == 10
    ends = np.flatnonzero(newline)
    offsets = np.empty(len(ends) + 1, dtype=np.int32)
    offsets[0] = 0
    offsets[1:] = ends - np.arange(len(ends))  # positions once the newlines are removed
    return pa.StringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(raw[~newline]))


def all_plain(values: pa.Array, skip: int = 0, extra: str = "") -> bool:
    """True when every value of ``values`` (a string array without nulls), from byte ``skip`` on, is
    a key in normal form that holds none of ``extra``: not empty, no leading ``/`` or ``.``, no
    ``//``, no ``/.``, no control character. False means only that some value *may* need work.
    """
    if _native is None or values.null_count or values.type != pa.string():
        return False  # the caller's per-value path decides
    offsets, data = _offsets_and_data(values)
    return _native.needs_work(offsets, data, len(values), skip, extra.encode()) < 0


def plain_keys(block: bytearray, rows_end: int, prefix: str, extra: str = "") -> tuple[pa.Array, np.ndarray] | None:
    """The usual block of a reference read in one compiled pass: when every newline-ended row of
    ``block[:rows_end]`` is ``prefix`` followed by a value ``all_plain`` passes (and holds no
    backslash, so no COPY escape or NULL), the keys without the prefix and their
    ``hash_strings64``; otherwise, or without the extension, None (take the general path).
    """
    if _native is None:
        return None
    capacity = rows_end + 1
    offsets = np.empty(capacity, dtype=np.int32)
    data = np.empty(rows_end, dtype=np.uint8)
    hashes = np.empty(capacity - 1, dtype=np.uint64)
    rows = _native.plain_keys(block, rows_end, prefix.encode(), extra.encode(), offsets, data, hashes)
    if rows < 0:
        return None
    keys = pa.StringArray.from_buffers(rows, pa.py_buffer(offsets[: rows + 1]),
                                       pa.py_buffer(data[: offsets[rows]]))
    return keys, hashes[:rows]


def _psycopg2_library() -> bytes:
    import psycopg2._psycopg

    return os.fsencode(psycopg2._psycopg.__file__)


def copy_applies(connection: Any) -> bool:
    """Whether ``copy_blocks`` can run on the psycopg2 ``connection``: the extension is built,
    the connection is a plain blocking one (not asynchronous, no green wait callback) with a
    transaction psycopg2 has already begun (or autocommit), and its libpq is reachable."""
    import psycopg2.extensions

    if (_native is None or connection.closed or connection.async_
            or psycopg2.extensions.get_wait_callback() is not None):
        return False
    in_transaction = connection.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    if not (connection.autocommit or in_transaction):
        return False  # psycopg2 would send BEGIN first
    return bool(_native.copy_applies(_psycopg2_library(), connection.pgconn_ptr))


def copy_blocks(connection: Any, sql: str, block_bytes: int, deliver: Callable[[bytearray, int], bool]) -> None:
    """Run ``sql`` (a ``COPY ... TO STDOUT``) on the psycopg2 ``connection`` in compiled code
    and call ``deliver(block, used)`` for each block of about ``block_bytes`` holding whole
    rows in ``block[:used]``; once ``deliver`` returns False the rest is read and dropped.

    psycopg2's ``copy_expert`` does the same with one Python call per row, which at short rows
    costs a core of its own next to PostgreSQL's. Only where ``copy_applies``. A failing statement raises
    the psycopg2 error class of its SQLSTATE, as ``copy_expert`` would.
    """
    status, sqlstate, message = _native.copy_blocks(
        _psycopg2_library(), connection.pgconn_ptr, sql.encode(), block_bytes, deliver)
    if status:
        raise _error_class(sqlstate.decode())(message.decode("utf-8", "replace"))


def _error_class(sqlstate: str) -> type[Exception]:
    import psycopg2
    import psycopg2.errors

    if not sqlstate:  # no server answer: the connection failed
        return psycopg2.OperationalError
    try:
        return psycopg2.errors.lookup(sqlstate)
    except KeyError:  # a code newer than this psycopg2
        return psycopg2.DatabaseError


# jsonb's canonical output of an object whose members are all plain strings (no escapes):
# {"k": "v", "k2": "v2"}. Such values expand without JSON decoding.
_SIMPLE_JSONB_OBJECT = r'^\{"[^"\\]*": "[^"\\]*"(, "[^"\\]*": "[^"\\]*")*\}$'


def object_values(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The member values of the simple jsonb objects among ``texts`` (no nulls), in order, and
    per text their number, or -1 for a text that is not such an object (``{"k": "v", ...}``
    with no backslash in any key or value) and must be decoded as JSON instead."""
    if _native is None or texts.type != pa.string():
        return _object_values_arrow(texts)
    offsets, data = _offsets_and_data(texts)
    value_offsets = np.empty(data.size // 4 + 2, dtype=np.int32)  # a value takes 4+ bytes: "k": ""
    value_data = np.empty(data.size, dtype=np.uint8)
    members = np.empty(len(texts), dtype=np.int32)
    count, length = _native.object_values(offsets, data, len(texts), value_offsets, value_data, members)
    values = pa.StringArray.from_buffers(count, pa.py_buffer(value_offsets[: count + 1]),
                                         pa.py_buffer(value_data[:length]))
    return values, members


# The fallback splits objects at '", "' and '": "', which a string holding ', ' or ': ' would
# also contain: it takes only objects whose strings hold no ',' or ':' (the rest are decoded).
_SPLITTABLE_JSONB_OBJECT = _SIMPLE_JSONB_OBJECT.replace(r'[^"\\]', r'[^"\\,:]')


def _object_values_arrow(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    simple = pc.match_substring_regex(texts, _SPLITTABLE_JSONB_OBJECT)
    inner = pc.binary_slice(texts.filter(simple).view(pa.binary()), 2, -2).view(pa.string())  # a": "x", "b": "y
    split = pc.split_pattern(inner, '", "')  # keys and values hold no '"'
    values = pc.list_element(pc.split_pattern(pc.list_flatten(split), '": "', max_splits=1), 1)
    members = np.full(len(texts), -1, dtype=np.int32)
    members[np.flatnonzero(simple.to_numpy(zero_copy_only=False))] = pc.list_value_length(split).to_numpy()
    return values.cast(pa.string()), members


def hash_strings64(keys: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string of ``keys``: equal strings hash equally wherever they sit.

    Two different keys collide with probability ~2**-64 (polynomial hashes mod 2**64 only
    collide structurally for strings of 2048+ bytes; S3 keys are at most 1024).
    """
    if _native is None or keys.type != pa.string():
        return _hash_strings64_numpy(keys)
    offsets, data = _offsets_and_data(keys)
    out = np.empty(len(keys), dtype=np.uint64)
    _native.hash64(offsets, data, len(keys), out)
    return out


_PRIME = 0x100000001B3  # FNV-1a's 64-bit prime; odd, so it has an inverse mod 2**64
_CHUNK_KEYS = 8192  # keys hashed per numpy pass: bounds the temporary arrays
_powers_cache: dict[str, np.ndarray] = {}


def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i mod 2**64 for i < length (grown on demand, kept for the process)."""
    if len(_powers_cache.get("forward", ())) < length:
        size = max(length, 1 << 20)
        inverse = pow(_PRIME, -1, 1 << 64)
        for name, base in (("forward", _PRIME), ("inverse", inverse)):
            table = np.full(size, base, dtype=np.uint64)
            table[0] = 1
            _powers_cache[name] = np.cumprod(table, dtype=np.uint64)  # wraps mod 2**64, as intended
    return _powers_cache["forward"], _powers_cache["inverse"]


def _hash_strings64_numpy(keys: pa.Array) -> np.ndarray:
    """``hash_strings64`` in numpy: each string's hash (nulls hash as the empty string).

    sum(b_i * P**i) via prefix sums over the data buffer, shifted per key by P**-start (so
    equal strings hash equally wherever they sit), plus the length, then murmur3's finaliser.
    """
    if keys.type == pa.large_string():
        offset_type: type[np.integer] = np.int64
    else:
        keys = keys.cast(pa.string())
        offset_type = np.int32
    count = len(keys)
    out = np.zeros(count, dtype=np.uint64)
    if count == 0:
        return out
    buffers = keys.buffers()
    itemsize = np.dtype(offset_type).itemsize
    offsets = np.frombuffer(buffers[1], dtype=offset_type, count=count + 1, offset=keys.offset * itemsize)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    for start in range(0, count, _CHUNK_KEYS):
        stop = min(count, start + _CHUNK_KEYS)
        bounds = offsets[start : stop + 1].astype(np.int64)
        first, last = int(bounds[0]), int(bounds[-1])
        forward, inverse = _powers(last - first + 1)
        weighted = np.multiply(data[first:last], forward[: last - first], dtype=np.uint64)
        prefix = np.zeros(last - first + 1, dtype=np.uint64)
        np.cumsum(weighted, dtype=np.uint64, out=prefix[1:])
        relative = bounds - first
        out[start:stop] = (prefix[relative[1:]] - prefix[relative[:-1]]) * inverse[relative[:-1]]
    # The length is mixed in so that a zero byte still counts ("a" and "a\0" differ).
    out += np.diff(offsets).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    out ^= out >> np.uint64(33)
    out *= np.uint64(0xFF51AFD7ED558CCD)
    out ^= out >> np.uint64(33)
    out *= np.uint64(0xC4CEB9FE1A85EC53)
    out ^= out >> np.uint64(33)
    return out
