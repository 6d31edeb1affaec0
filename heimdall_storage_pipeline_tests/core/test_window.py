"""The check-to-delete window is bounded on the first try and on every retry.

A stalled S3 server (a proxy in front of the real one holds the first DeleteObjects, while the
application starts naming one of the batch's keys) must not stretch the window: the retry finds
the check too old, checks the references again and keeps the key.
"""

from __future__ import annotations

import secrets
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from heimdall_storage_pipeline.core.deletion import REVALIDATION_MAX_AGE
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
from heimdall_storage_pipeline_tests.faulty_proxy import faulty_proxy, s3_error


def test_a_retry_after_a_stalled_request_checks_the_references_again(
    seaweed: SeaweedFS, db_engine: sa.Engine, tmp_path: Path
) -> None:
    client = seaweed.client()
    name = f"t-window-{secrets.token_hex(4)}"
    client.make_bucket(name)
    orphans = [f"gone/{i:02d}.npy" for i in range(12)]
    for key in orphans:
        put(client, name, key)
    table = refs_table(db_engine)
    rig = make_rig(seaweed.settings(), db_engine, tmp_path / "manifests")
    rig.offset = timedelta(days=1)
    policy = bucket_policy(name, table, min_age=timedelta(hours=1))
    orphans_uri = rig.scan(policy)
    victim = orphans[5]
    stalled: list[str] = []

    def stall_the_first_delete(method: str, path: str) -> tuple[int, bytes] | None:
        if method == "POST" and "delete" in path and not stalled:
            stalled.append(path)
            add_refs(db_engine, table, [victim])  # the application names the key meanwhile
            time.sleep(REVALIDATION_MAX_AGE + 0.5)  # the stalled server: the batch's check grows old
            return 503, s3_error("SlowDown", "the server is stalled")
        return None

    with faulty_proxy(seaweed.settings().endpoint, stall_the_first_delete) as endpoint:
        report = rig.delete(policy, orphans_uri, batch_size=len(orphans), s3=seaweed.settings(endpoint=endpoint))

    assert stalled, "the proxy never saw a DeleteObjects request"
    assert victim in listed_keys(client, name)
    assert listed_keys(client, name) == {victim}
    assert (report.count(Outcome.DELETED), report.count(Outcome.SKIPPED_REFERENCED)) == (11, 1)
    assert report.revalidated_again == len(orphans)
    rows = {row.key: row for row in rig.audit_rows(name)}
    assert (rows[victim].status, rows[victim].error) == ("not_deleted", "skipped_referenced when checked again")
