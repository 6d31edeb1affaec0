"""Any key the server can store goes through listing, normalisation, the re-check and deletion.

Keys from arbitrary Unicode (private use U+E000-U+F8FF, astral planes, combining marks, control
characters; surrogates cannot be sent in UTF-8, so no server holds one): orphans are deleted,
referenced keys kept, and a key the normalisation cannot read is reported and left alone without
blocking any other key of the bucket.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core.keys import InvalidKeyError, normalize_key
from heimdall_storage_pipeline.core.revalidation import LISTING_MIN_KEYS
from heimdall_storage_pipeline.core.safety import Outcome
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS
from heimdall_storage_pipeline_tests.cleanup_support import (
    add_refs,
    bucket_policy,
    listed_keys,
    make_rig,
    put,
    refs_table,
)

SEGMENT = st.text(
    st.one_of(
        st.characters(min_codepoint=0xE000, max_codepoint=0xF8FF),  # private use, U+E000 first among them
        st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, exclude_categories=("Cs", "Cn")),
        st.characters(categories=("Mn", "Me")),  # combining marks
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.characters(min_codepoint=0x01, max_codepoint=0x1F),  # control characters: unparseable keys
        st.sampled_from(["\ue000", "\uf8ff", "\ud7ff", "\uffff", "é", "\u0301"]),
    ),
    min_size=1, max_size=12,
).filter(lambda segment: not {"/", "\\"} & set(segment) and segment not in (".", ".."))  # SeaweedFS reads "\\" as "/"
KEY = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join).filter(str.strip)  # minio refuses blank names
# SeaweedFS stores keys as a file tree: "a" and "a/b" cannot both be objects there.
KEYS = st.lists(KEY, min_size=2, max_size=25, unique=True).filter(
    lambda keys: not any(other.startswith(key + "/") for key in keys for other in keys))


@pytest.fixture(scope="module")
def own_seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this module's own: whatever these keys do to a server, the suite's is not touched."""
    server = SeaweedFS(workdir=tmp_path_factory.mktemp("seaweed-any-key")).start()
    yield server
    server.stop()


def _parseable(key: str) -> bool:
    try:
        return normalize_key(key) == key
    except InvalidKeyError:
        return False


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=KEYS, data=st.data())
# A batch (re-checked through a listing from just before its first key) whose first key ends in U+E000.
@example(keys=["a\ue000", *(f"b{i}\U0001d11e" for i in range(9))], data=None).via("the U+E000 report")
def test_every_key_is_listed_rechecked_and_deleted_or_kept_as_it_should(
    own_seaweed: SeaweedFS, db_engine: sa.Engine, tmp_path: Path, keys: list[str], data: st.DataObject | None
) -> None:
    seaweed = own_seaweed
    client = seaweed.client()
    name = f"t-anykey-{secrets.token_hex(4)}"
    client.make_bucket(name)
    for key in keys:
        put(client, name, key)
    stored = listed_keys(client, name)  # what the server holds is the truth, byte for byte
    referenced = set(data.draw(st.lists(st.sampled_from(sorted(stored)), unique=True))) if data else set()
    table = refs_table(db_engine)
    add_refs(db_engine, table, sorted(referenced))
    rig = make_rig(seaweed.settings(), db_engine, tmp_path / secrets.token_hex(4))
    rig.offset = timedelta(days=1)
    policy = bucket_policy(name, table, min_age=timedelta(hours=1), batch_size=LISTING_MIN_KEYS + 2)

    report = rig.delete(policy, rig.scan(policy), batch_size=LISTING_MIN_KEYS + 2)

    unreadable = {key for key in stored if not _parseable(key)}
    assert listed_keys(client, name) == referenced | unreadable
    assert report.count(Outcome.FAILED) == 0 and report.failures == []
    assert report.count(Outcome.DELETED) == len(stored - referenced - unreadable)
