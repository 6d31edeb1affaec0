"""Orphan diff: inventory minus references minus companions, split by age at one ``as_of``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from heimdall_storage_pipeline.core.clock import ensure_utc
from heimdall_storage_pipeline.core.errors import StaleInputError
from heimdall_storage_pipeline.core.health import health_status, share
from heimdall_storage_pipeline.core.keys import (
    NEEDS_NORMALISATION_PATTERN,
    InvalidKeyError,
    normalize_key,
)
from heimdall_storage_pipeline.core.manifests import ORPHANS_SCHEMA, ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy, CompanionRule
from heimdall_storage_pipeline.core.safety import age_cutoff

SAMPLE_SIZE = 10
LARGEST_SHOWN = 10
# Orphan age histogram edges, in days; the last bin is open-ended.
AGE_BINS_DAYS = (1, 7, 30, 60, 90)


@dataclass(frozen=True)
class OrphanDiffResult:
    bucket: str
    as_of: datetime
    object_count: int
    total_bytes: int
    referenced_count: int
    orphan_count: int
    orphan_bytes: int
    eligible_orphan_count: int
    eligible_orphan_bytes: int
    young_orphan_count: int
    young_orphan_bytes: int
    unparseable_object_count: int
    unparseable_object_sample: list[str]
    dangling_reference_count: int
    dangling_sample: list[str]
    age_histogram: list[dict[str, int | str]]
    largest_eligible: list[dict[str, int | str]]
    manifest_uri: str

    @property
    def orphan_share_bytes(self) -> float:
        return share(self.orphan_bytes, self.total_bytes)

    @property
    def orphan_share_count(self) -> float:
        return share(self.orphan_count, self.object_count)

    @property
    def health_status(self) -> str:
        return health_status(self.orphan_share_bytes)


def check_snapshot_order(inventory_listed_at: datetime, references_snapshot_at: datetime) -> None:
    """References must be read after the listing finished (uploads precede their rows)."""
    if ensure_utc(references_snapshot_at) < ensure_utc(inventory_listed_at):
        raise StaleInputError(
            f"the reference snapshot ({references_snapshot_at.isoformat()}) is older than the "
            f"inventory listing it would be compared with ({inventory_listed_at.isoformat()}); "
            f"objects uploaded in between would look orphaned. Re-materialize referenced_keys "
            f"(or the whole storage_scan_job) for this bucket"
        )


def normalise_listed_keys(keys: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Normalised keys (null where unparseable) and a parseable mask.

    Only keys that need it take the per-key Python path; listings almost never have any.
    """
    needs_work = pc.match_substring_regex(keys, NEEDS_NORMALISATION_PATTERN)
    if not pc.any(needs_work).as_py():
        return keys, pc.is_valid(keys)
    normalised: list[str | None] = keys.to_pylist()
    for index in pc.indices_nonzero(needs_work).to_pylist():
        try:
            normalised[index] = normalize_key(normalised[index])
        except InvalidKeyError:
            normalised[index] = None
    array = pa.array(normalised, pa.string())
    return array, pc.is_valid(array)


def companion_keys(referenced: pa.Array, rules: tuple[CompanionRule, ...]) -> pa.Array:
    """Keys kept because a referenced key derives them (e.g. ``x.npy`` keeps ``x_metadata.json``)."""
    parts = [pa.array([], pa.string())]
    for rule in rules:
        matching = referenced.filter(pc.match_substring_regex(referenced, rule.match))
        parts.append(pc.replace_substring_regex(matching, rule.match, rule.companion))
    return pa.concat_arrays(parts)


def _count_and_bytes(sizes: pa.Array, mask: pa.Array) -> tuple[int, int]:
    selected = sizes.filter(mask)
    return len(selected), pc.sum(selected).as_py() or 0


def _age_histogram(ages_days: pa.Array, sizes: pa.Array) -> list[dict[str, int | str]]:
    rows: list[dict[str, int | str]] = []
    for low, high in zip((0, *AGE_BINS_DAYS), (*AGE_BINS_DAYS, None), strict=True):
        in_bin = pc.greater_equal(ages_days, low)
        if high is not None:
            in_bin = pc.and_(in_bin, pc.less(ages_days, high))
        count, size = _count_and_bytes(sizes, in_bin)
        label = f"{low}-{high} d" if high is not None else f">= {low} d"
        rows.append({"age": label, "count": count, "bytes": size})
    return rows


def compute_orphan_diff(
    *,
    bucket: BucketPolicy,
    store: ManifestStore,
    inventory_uri: str,
    references_uri: str,
    as_of: datetime,
    run_id: str,
) -> OrphanDiffResult:
    """Write the orphan manifest for ``bucket`` and return its figures.

    An orphan is a listed object whose normalised key no reference or companion rule names.
    It is eligible for deletion when it is at least the bucket's minimum age at ``as_of``
    (age == minimum age counts as old enough) and its key could be normalised: a key we
    cannot parse is reported, never deleted.
    """
    as_of = ensure_utc(as_of, "as_of")
    inventory = store.read_table(inventory_uri).combine_chunks()
    referenced = pc.unique(
        store.read_table(references_uri, columns=["key"]).column("key").combine_chunks()
    )
    protected = pa.concat_arrays([referenced, companion_keys(referenced, bucket.companions)])

    normalised, parseable = normalise_listed_keys(inventory.column("key").combine_chunks())
    orphan_mask = pc.invert(pc.is_in(normalised, value_set=protected))
    orphans = inventory.filter(orphan_mask)
    orphan_parseable = parseable.filter(orphan_mask)
    timestamp_type = inventory.schema.field("last_modified").type
    last_modified = orphans.column("last_modified").combine_chunks()
    cutoff = age_cutoff(as_of, bucket.min_age)
    old_enough = pc.less_equal(last_modified, pa.scalar(cutoff, type=timestamp_type))
    eligible = pc.and_(old_enough, orphan_parseable)
    young = pc.and_(pc.invert(old_enough), orphan_parseable)

    uri = store.new_uri("orphans", bucket.name, as_of, run_id)
    store.write_table(uri, orphans.append_column("eligible", eligible).cast(ORPHANS_SCHEMA))

    sizes = orphans.column("size").combine_chunks()
    eligible_count, eligible_bytes = _count_and_bytes(sizes, eligible)
    young_count, young_bytes = _count_and_bytes(sizes, young)
    age_us = pc.subtract(pa.scalar(as_of, type=timestamp_type), last_modified).cast(pa.int64())
    ages_days = pc.floor(pc.divide(age_us.cast(pa.float64()), timedelta(days=1) / timedelta(microseconds=1)))
    eligible_orphans = orphans.filter(eligible)
    largest = eligible_orphans.take(
        pc.select_k_unstable(
            eligible_orphans, min(LARGEST_SHOWN, len(eligible_orphans)), sort_keys=[("size", "descending")]
        )
    )
    dangling_keys = referenced.filter(pc.invert(pc.is_in(referenced, value_set=normalised)))
    unparseable_keys = inventory.column("key").filter(pc.invert(parseable))
    return OrphanDiffResult(
        bucket=bucket.name,
        as_of=as_of,
        object_count=len(inventory),
        total_bytes=pc.sum(inventory.column("size")).as_py() or 0,
        referenced_count=len(referenced),
        orphan_count=len(orphans),
        orphan_bytes=pc.sum(sizes).as_py() or 0,
        eligible_orphan_count=eligible_count,
        eligible_orphan_bytes=eligible_bytes,
        young_orphan_count=young_count,
        young_orphan_bytes=young_bytes,
        unparseable_object_count=len(unparseable_keys),
        unparseable_object_sample=unparseable_keys.slice(0, SAMPLE_SIZE).to_pylist(),
        dangling_reference_count=len(dangling_keys),
        dangling_sample=dangling_keys.slice(0, SAMPLE_SIZE).to_pylist(),
        age_histogram=_age_histogram(ages_days, sizes),
        largest_eligible=[
            {"key": row["key"], "size": row["size"], "last_modified": row["last_modified"].isoformat()}
            for row in largest.select(["key", "size", "last_modified"]).to_pylist()
        ],
        manifest_uri=uri,
    )


def render_largest_table(rows: list[dict[str, int | str]]) -> str:
    if not rows:
        return "_No eligible orphans._"
    lines = ["| key | size (bytes) | last modified (UTC) |", "| --- | ---: | --- |"]
    lines += [f"| `{r['key']}` | {r['size']} | {r['last_modified']} |" for r in rows]
    return "\n".join(lines)


def render_age_histogram(rows: list[dict[str, int | str]]) -> str:
    lines = ["| orphan age | objects | bytes |", "| --- | ---: | ---: |"]
    lines += [f"| {r['age']} | {r['count']} | {r['bytes']} |" for r in rows]
    return "\n".join(lines)


def dumps_sample(sample: list[str]) -> str:
    return json.dumps(sample, ensure_ascii=False)
