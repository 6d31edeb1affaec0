"""An incremental inventory (the previous manifest + the bucket's events, merged in DuckDB) against a full
listing of the same bucket, in one run, as a ratio (issue 19's target: at most 2 %).

    .venv/bin/python bench/incremental.py --objects 1000000 --changes 1000 --data-dir /var/tmp/incremental-bench

The bucket is filled once as ``bench/scan_memory.py`` fills its buckets (filer entries loaded with
``fs.meta.load``; a later run with the same ``--data-dir`` reuses them). Each run then:

1. lists the bucket in full: the previous manifest (the base);
2. makes ``--changes`` real changes through S3 (40 % creates, 30 % overwrites, 30 % deletes) and appends
   one event per change to a fresh PostgreSQL event log, as the receiver would (not timed);
3. ``--repeats`` times, alternating: the incremental inventory (read the events after the base's cursor
   from PostgreSQL, merge, write the new manifest: ``bucket_inventory``'s incremental path) and a full
   listing of the changed bucket (``bucket_inventory``'s full path);
4. checks that the incremental manifest's rows equal the full listing's, prints best and median of
   each and the ratio of the bests, and undoes the changes.

Nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", help="keep SeaweedFS's data here and reuse the bucket it holds")
    args = parser.parse_args()

    import sqlalchemy as sa
    from scan_memory import MARKER, ensure_buckets, object_key

    from heimdall_storage_pipeline.core.clock import utc_now
    from heimdall_storage_pipeline.core.events import EventLog, ObjectEvent, merge_events
    from heimdall_storage_pipeline.core.listing import list_bucket_to_manifest
    from heimdall_storage_pipeline.core.manifests import ManifestStore
    from heimdall_storage_pipeline.core.migrations import apply_migrations
    from heimdall_storage_pipeline.local.postgres import (
        LOCAL_SERVER_URL,
        create_database,
        drop_database,
        reachable,
        start_embedded,
    )
    from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    data_dir = Path(args.data_dir).resolve() if args.data_dir else work / "seaweedfs"
    data_dir.mkdir(parents=True, exist_ok=True)
    admin_url = LOCAL_SERVER_URL if reachable(LOCAL_SERVER_URL) else start_embedded(work / "pg")
    database_url = create_database(admin_url, prefix="bench_incremental")
    engine = sa.create_engine(database_url)
    seaweed = SeaweedFS(workdir=data_dir).start()
    bucket = f"incremental-{args.objects}"
    store = ManifestStore(str(work / "manifests"))
    client = seaweed.client()
    creates, overwrites, deletes = [], [], []
    try:
        ensure_buckets(seaweed, {bucket: args.objects}, data_dir / MARKER, work)
        apply_migrations(engine, "audit")
        events = EventLog(engine)
        events.mark_gap([bucket], "bench", alive_seconds=3600)
        base = list_bucket_to_manifest(seaweed.settings(), bucket, store, "bench-base")
        print(f"base: {base.object_count:,} objects listed in {base.listing_seconds:.2f} s", flush=True)

        run = uuid.uuid4().hex[:8]
        n_create, n_over = int(args.changes * 0.4), int(args.changes * 0.3)
        creates = [f"bench-new/{run}/{i:05d}.bin" for i in range(n_create)]
        step = max(args.objects // args.changes, 1)
        overwrites = [object_key(i * step) for i in range(n_over)]
        deletes = [object_key(i * step + 1) for i in range(args.changes - n_create - n_over)]
        changed: list[ObjectEvent] = []

        def written(key: str, body: bytes) -> None:
            client.put_object(bucket, key, io.BytesIO(body), len(body))
            stat = client.stat_object(bucket, key)
            changed.append(ObjectEvent(bucket, key, False, stat.size or 0, (stat.etag or "").strip('"'),
                                       stat.last_modified, time.time_ns(), None, uuid.uuid4().hex, "bench"))

        for key in creates:
            written(key, b"new")
        for key in overwrites:
            written(key, b"overwritten")
        for key in deletes:
            client.remove_object(bucket, key)
            changed.append(ObjectEvent(bucket, key, True, 0, "", utc_now(), time.time_ns(), None,
                                       uuid.uuid4().hex, "bench"))
        events.append(changed)
        upto = events.state(bucket).last_seq
        print(f"{len(changed):,} changes made and logged as events", flush=True)

        incremental_seconds, full_seconds = [], []
        for repeat in range(args.repeats):
            began = time.perf_counter()
            table = events.read(bucket, 0, upto)
            uri = store.new_uri("inventory", bucket, utc_now(), f"bench-incremental-{repeat}")
            count, _ = merge_events(store, base.manifest_uri, table, uri)
            incremental_seconds.append(time.perf_counter() - began)
            listing = list_bucket_to_manifest(seaweed.settings(), bucket, store, f"bench-full-{repeat}")
            full_seconds.append(listing.listing_seconds)
            same = store.read_table(uri).sort_by("key") == store.read_table(listing.manifest_uri).sort_by("key")
            print(f"repeat {repeat + 1}: incremental {incremental_seconds[-1]:.3f} s ({count:,} objects), full "
                  f"listing {full_seconds[-1]:.2f} s ({listing.object_count:,} objects), rows equal: {same}",
                  flush=True)
            if not same:
                print("the incremental manifest differs from the full listing", file=sys.stderr)
                return 1
        best_incremental, best_full = min(incremental_seconds), min(full_seconds)
        print(f"\nincremental inventory after {len(changed):,} changes: best {best_incremental:.3f} s, median "
              f"{statistics.median(incremental_seconds):.3f} s")
        print(f"full listing of {listing.object_count:,} objects: best {best_full:.2f} s, median "
              f"{statistics.median(full_seconds):.2f} s")
        print(f"ratio (best / best): {100 * best_incremental / best_full:.2f} % (target: <= 2 %)")
        return 0
    finally:
        for key in creates:
            client.remove_object(bucket, key)
        for key in deletes + overwrites:  # the content the fill gave them
            client.put_object(bucket, key, io.BytesIO(b"x"), 1)
        seaweed.stop()
        engine.dispose()
        drop_database(admin_url, database_url)


if __name__ == "__main__":
    sys.exit(main())
