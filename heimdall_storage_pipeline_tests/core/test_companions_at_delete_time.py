"""Random scan / reference-change / delete interleavings over recordings and their sidecars.

Whatever happens between a scan and a deletion, no object whose owner (or itself) is referenced
when it is deleted is ever deleted, in the orphan cleanup and in the prefix cleanups (purge,
event-driven) alike; and everything that was an orphan at the scan and is still unprotected is.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core.deletion import delete_candidates
from heimdall_storage_pipeline.core.policy import CompanionRule
from heimdall_storage_pipeline.core.purge import list_prefix_candidates
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

RECORDINGS = 4
SIDECAR = CompanionRule(name="sidecar", match=r"^(.+)\.npy$", companion=r"\1_metadata.json")


def recording(index: int) -> str:
    return f"rec/{index}.npy"


def sidecar(index: int) -> str:
    return f"rec/{index}_metadata.json"


def protected(keys: set[str], referenced: set[int]) -> set[str]:
    """What references to these recordings keep: each recording and its sidecar."""
    return keys & {k for i in referenced for k in (recording(i), sidecar(i))}


STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("refs"), st.frozensets(st.integers(0, RECORDINGS - 1))),
        st.tuples(st.just("scan"), st.none()),
        st.tuples(st.just("delete"), st.sampled_from(["orphans", "prefix"])),
    ),
    min_size=1, max_size=6,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial=st.frozensets(st.integers(0, RECORDINGS - 1)), steps=STEPS)
def test_no_object_whose_owner_is_referenced_at_delete_time_is_deleted(
    seaweed: SeaweedFS, db_engine: sa.Engine, tmp_path: Path, initial: frozenset[int], steps: list
) -> None:
    client = seaweed.client()
    name = f"t-comp-{secrets.token_hex(4)}"
    client.make_bucket(name)
    table = refs_table(db_engine)
    keys = {k for i in range(RECORDINGS) for k in (recording(i), sidecar(i))}
    for key in keys:
        put(client, name, key)
    bucket = replace(bucket_policy(name, table, min_age=timedelta(hours=1), batch_size=3), companions=(SIDECAR,))
    rig = make_rig(seaweed.settings(), db_engine, tmp_path / secrets.token_hex(4))
    rig.offset = timedelta(days=1)  # every object is old enough

    referenced = set(initial)
    add_refs(db_engine, table, [recording(i) for i in referenced])
    orphans_uri = rig.scan(bucket)
    orphans_at_scan = keys - protected(keys, referenced)
    for action, argument in [*steps, ("delete", "orphans")]:
        if action == "refs":
            with db_engine.begin() as connection:
                connection.execute(sa.text(f"DELETE FROM {table}"))
            referenced = set(argument)
            add_refs(db_engine, table, [recording(i) for i in referenced])
        elif action == "scan":
            orphans_uri = rig.scan(bucket)
            orphans_at_scan = listed_keys(client, name) - protected(keys, referenced)
        else:
            before = listed_keys(client, name)
            if argument == "orphans":
                report = rig.delete(bucket, orphans_uri, batch_size=3)
                expected = (orphans_at_scan & before) - protected(keys, referenced)
            else:  # a purge or an event-driven cleanup: every object under the prefix, age-exempt
                context = rig.context()
                report = delete_candidates(context, bucket, list_prefix_candidates(context, name, ("rec/",)),
                                           dry_run=False, batch_size=3, age_exempt=True)
                expected = before - protected(keys, referenced)
            deleted = before - listed_keys(client, name)
            assert not deleted & protected(keys, referenced), (deleted, referenced)
            assert deleted == expected
            assert report.count(Outcome.DELETED) == len(deleted)
