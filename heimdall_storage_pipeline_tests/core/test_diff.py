"""The orphan diff: edge cases, spilling, and equality with a plain in-memory diff."""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core import diff
from heimdall_storage_pipeline.core.diff import OrphanDiffResult, compute_orphan_diff
from heimdall_storage_pipeline.core.errors import ManifestError
from heimdall_storage_pipeline.core.keys import InvalidKeyError, normalize_key
from heimdall_storage_pipeline.core.manifests import INVENTORY_SCHEMA, REFERENCES_SCHEMA, ManifestStore
from heimdall_storage_pipeline.core.policy import BucketPolicy, CompanionRule
from heimdall_storage_pipeline.local.seaweedfs import SeaweedFS

AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MIN_AGE = timedelta(days=30)
OLD = AS_OF - timedelta(days=45)
SIDECAR = CompanionRule("sidecar", r"^(.*)\.npy$", r"\1_metadata.json")
PREVIEW = CompanionRule("preview", r"^raw/(.*)\.wav$", r"previews/\1.mp3")

# How the diff is run (module settings it is run with): as configured, and on one thread.
MODES: dict[str, dict[str, object]] = {
    "default": {},
    "one thread": {"THREADS": 1},
}


@dataclass(frozen=True)
class Obj:
    key: str
    size: int = 1
    last_modified: datetime = OLD
    etag: str = "e"


def policy(*rules: CompanionRule) -> BucketPolicy:
    return BucketPolicy(name="bkt", enabled=True, min_age=MIN_AGE, batch_size=100, description="test",
                        references=(), companions=rules)


@contextmanager
def tuned(settings: dict[str, object]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name, value in settings.items():
            stack.enter_context(mock.patch.object(diff, name, value))
        yield


def run(store: ManifestStore, objects: list[Obj], references: list[str], *, rules: tuple[CompanionRule, ...] = (),
        work_dir: str | None = None, row_group_size: int = 5, **settings: object) -> tuple[OrphanDiffResult, pa.Table]:
    """Write the two manifests (several row groups each), diff them with ``settings`` patched into the diff
    module; returns the result and orphans."""
    inventory = pa.table({
        "key": [o.key for o in objects], "size": [o.size for o in objects],
        "last_modified": [o.last_modified for o in objects], "etag": [o.etag for o in objects],
    }, schema=INVENTORY_SCHEMA)
    refs = pa.table({"key": references, "source": ["s"] * len(references)}, schema=REFERENCES_SCHEMA)
    inventory_uri = store.new_uri("inventory", "bkt", AS_OF, "run00000")
    references_uri = store.new_uri("references", "bkt", AS_OF, "run00000")
    for uri, table in ((inventory_uri, inventory), (references_uri, refs)):
        with store.writer(uri, table.schema) as writer:
            writer.write_table(table, row_group_size=row_group_size)
    with tuned(settings):
        result = compute_orphan_diff(
            bucket=policy(*rules), store=store, inventory_uri=inventory_uri, references_uri=references_uri,
            as_of=AS_OF, run_id="run00000", work_dir=work_dir,
        )
    return result, store.read_table(result.manifest_uri)


# --- a plain reference implementation, one Python set ---------------------------------------


def reference_diff(objects: list[Obj], references: list[str], rules: tuple[CompanionRule, ...]) -> dict[str, object]:
    """What the diff must compute, written the obvious way."""
    def normalised(key: str) -> str | None:
        try:
            return normalize_key(key)
        except InvalidKeyError:
            return None

    unique_refs = list(dict.fromkeys(references))
    protected = set(unique_refs)
    for rule in rules:
        protected |= {re.sub(rule.match, rule.companion, r) for r in unique_refs if re.search(rule.match, r)}
    norms = [normalised(o.key) for o in objects]
    listed = {n for n in norms if n is not None}
    cutoff = AS_OF - MIN_AGE
    rows = []
    for obj, norm in zip(objects, norms, strict=True):
        if norm is not None and norm in protected:
            continue
        rows.append({"key": obj.key, "size": obj.size, "last_modified": obj.last_modified, "etag": obj.etag,
                     "eligible": norm is not None and obj.last_modified <= cutoff})
    parseable = [r for r, n in zip(rows, (normalised(r["key"]) for r in rows), strict=True) if n is not None]
    eligible = [r for r in rows if r["eligible"]]
    young = [r for r in parseable if not r["eligible"]]
    dangling = [r for r in unique_refs if r not in listed]
    unparseable = [o.key for o, n in zip(objects, norms, strict=True) if n is None]
    histogram = []
    edges = (0, *diff.AGE_BINS_DAYS)
    for low, high in zip(edges, (*diff.AGE_BINS_DAYS, None), strict=True):
        ages = [(r, math.floor(((AS_OF - r["last_modified"]) // timedelta(microseconds=1)) / 86_400e6))
                for r in rows]
        inside = [r for r, age in ages if age >= low and (high is None or age < high)]
        histogram.append({"age": f"{low}-{high} d" if high is not None else f">= {low} d",
                          "count": len(inside), "bytes": sum(r["size"] for r in inside)})
    return {
        "object_count": len(objects), "total_bytes": sum(o.size for o in objects),
        "referenced_count": len(unique_refs), "orphan_count": len(rows), "orphan_bytes": sum(r["size"] for r in rows),
        "eligible_orphan_count": len(eligible), "eligible_orphan_bytes": sum(r["size"] for r in eligible),
        "young_orphan_count": len(young), "young_orphan_bytes": sum(r["size"] for r in young),
        "unparseable_object_count": len(unparseable), "unparseable_object_sample": unparseable[:10],
        "dangling_reference_count": len(dangling), "dangling_sample": dangling[:10],
        "age_histogram": histogram, "largest_sizes": sorted((r["size"] for r in eligible), reverse=True)[:10],
        "rows": rows,
    }


def assert_matches_reference(result: OrphanDiffResult, orphans: pa.Table, objects: list[Obj],
                             references: list[str], rules: tuple[CompanionRule, ...]) -> None:
    expected = reference_diff(objects, references, rules)
    assert orphans.to_pylist() == expected.pop("rows")  # same rows, in inventory order
    largest_sizes = expected.pop("largest_sizes")
    assert [row["size"] for row in result.largest_eligible] == largest_sizes
    eligible_keys = {row["key"] for row in orphans.to_pylist() if row["eligible"]}
    assert {row["key"] for row in result.largest_eligible} <= eligible_keys
    assert {name: getattr(result, name) for name in expected} == expected
    # Plain ints: Dagster's int metadata refuses anything else (a SQL sum is a 128-bit decimal).
    assert {type(getattr(result, name)) for name in expected if name.endswith(("_count", "_bytes"))} == {int}
    assert {type(row[key]) for row in result.age_histogram for key in ("count", "bytes")} == {int}


# --- edge cases ---------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ManifestStore:
    return ManifestStore(str(tmp_path / "manifests"))


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> dict[str, object]:
    return MODES[request.param]


def test_keys_needing_normalisation_match_their_references(store: ManifestStore, mode: dict[str, object]) -> None:
    objects = [Obj("/a//b.npy"), Obj("a/b.npy"), Obj("c///d.npy"), Obj("plain.npy"), Obj("//e")]
    references = ["a/b.npy", "c/d.npy", "e"]
    result, orphans = run(store, objects, references, **mode)
    assert orphans.column("key").to_pylist() == ["plain.npy"]
    assert result.dangling_reference_count == 0
    assert_matches_reference(result, orphans, objects, references, ())


def test_unparseable_listed_keys_are_orphans_never_eligible(store: ManifestStore, mode: dict[str, object]) -> None:
    weird = ["x/../y.npy", "./z", "a/./b", "ctl\x01key", "..", "tab\tkey"]
    objects = [Obj(k) for k in weird] + [Obj("young.npy", last_modified=AS_OF)] + [Obj(f"ok/{i}") for i in range(12)]
    references = [f"ok/{i}" for i in range(12)] + ["x/y.npy"]
    result, orphans = run(store, objects, references, **mode)
    assert result.unparseable_object_count == len(weird)
    assert result.unparseable_object_sample == weird
    assert orphans.column("key").to_pylist() == [*weird, "young.npy"]
    assert not any(orphans.column("eligible").to_pylist())
    assert (result.eligible_orphan_count, result.young_orphan_count) == (0, 1)
    assert result.dangling_sample == ["x/y.npy"]
    assert_matches_reference(result, orphans, objects, references, ())


def test_unparseable_sample_keeps_the_first_ten_in_listing_order(store: ManifestStore, mode: dict[str, object]) -> None:
    objects = [Obj(f"d{i:02d}/../k") for i in range(25)]
    result, _ = run(store, objects, [], **mode)
    assert result.unparseable_object_count == 25
    assert result.unparseable_object_sample == [f"d{i:02d}/../k" for i in range(10)]


def test_companions_protect_their_keys(store: ManifestStore, mode: dict[str, object]) -> None:
    pairs = [(f"s/{i}.npy", f"s/{i}_metadata.json") for i in range(40)]
    objects = [Obj(k) for pair in pairs for k in pair] + [Obj("s/lonely_metadata.json")]
    references = [npy for npy, _ in pairs]
    result, orphans = run(store, objects, references, rules=(SIDECAR,), **mode)
    assert orphans.column("key").to_pylist() == ["s/lonely_metadata.json"]
    assert result.referenced_count == 40
    assert_matches_reference(result, orphans, objects, references, (SIDECAR,))


def test_dangling_references_count_and_sample_in_first_occurrence_order(
    store: ManifestStore, mode: dict[str, object]
) -> None:
    objects = [Obj(f"here/{i}") for i in range(10)]
    missing = [f"gone/{i:02d}" for i in range(15)]
    # Duplicates, interleaved with existing keys: the sample follows first occurrences.
    references = [missing[3], "here/1", missing[3], *missing, "here/2", missing[0]]
    result, orphans = run(store, objects, references, **mode)
    assert result.dangling_reference_count == 15
    assert result.dangling_sample == [missing[3], *missing[:3], *missing[4:10]]
    assert result.referenced_count == 17
    assert_matches_reference(result, orphans, objects, references, ())


def test_a_companion_is_not_a_dangling_reference(store: ManifestStore, mode: dict[str, object]) -> None:
    objects = [Obj("a.npy")]
    result, _ = run(store, objects, ["a.npy"], rules=(SIDECAR,), **mode)
    assert result.dangling_reference_count == 0  # a.npy's absent sidecar is not "referenced"


@pytest.mark.parametrize("objects, references", [
    ([], []),
    ([], ["ref/a", "ref/b", "ref/a"]),
    ([Obj("a", size=5), Obj("b", size=7)], []),
])
def test_empty_inventory_or_references(store: ManifestStore, mode: dict[str, object], objects: list[Obj],
                                       references: list[str]) -> None:
    result, orphans = run(store, objects, references, **mode)
    assert orphans.schema.names == ["key", "size", "last_modified", "etag", "eligible"]
    assert result.orphan_count == len(objects)
    assert result.dangling_reference_count == len(set(references))
    assert_matches_reference(result, orphans, objects, references, ())


def test_largest_eligible_and_histogram(store: ManifestStore, mode: dict[str, object]) -> None:
    objects = [Obj(f"k/{i}", size=i * 10, last_modified=AS_OF - timedelta(days=i, hours=1)) for i in range(120)]
    objects.append(Obj("future", size=10_000, last_modified=AS_OF + timedelta(days=2)))
    result, orphans = run(store, objects, [f"k/{i}" for i in range(0, 120, 2)], **mode)
    assert [row["key"] for row in result.largest_eligible] == [f"k/{i}" for i in range(119, 99, -2)]
    assert result.age_histogram[1] == {"age": "1-7 d", "count": 3, "bytes": 10 + 30 + 50}
    assert_matches_reference(result, orphans, objects, [f"k/{i}" for i in range(0, 120, 2)], ())


def test_a_bucket_larger_than_the_memory_limit_spills_and_leaves_nothing_behind(
    store: ManifestStore, tmp_path: Path
) -> None:
    """The keys alone outgrow DuckDB's budget, so the joins, tables and sort go through the spill directory."""
    work = tmp_path / "work"
    work.mkdir()
    objects = [Obj(f"spill/{i:06d}/{'x' * 300}.npy", size=i % 977, last_modified=OLD - timedelta(hours=i % 2000))
               for i in range(250_000)]
    objects += [Obj(f"spill/{i:06d}/{'x' * 300}_metadata.json") for i in range(0, 250_000, 50)]
    references = [o.key for o in objects[:250_000] if int(o.key[6:12]) % 3]
    assert sum(len(o.key) for o in objects) > 64 * 1024**2  # the premise: more than the budget below
    result, orphans = run(store, objects, references, rules=(SIDECAR,), work_dir=str(work), row_group_size=50_000,
                          MEMORY_LIMITS=("64MB",))
    assert_matches_reference(result, orphans, objects, references, (SIDECAR,))
    assert list(work.iterdir()) == []


def test_a_diff_that_overruns_its_memory_budget_runs_again_with_the_next(store: ManifestStore) -> None:
    objects = [Obj(f"k/{i}") for i in range(50)]
    connect = diff._connect
    with mock.patch.object(diff, "_connect", wraps=connect) as connected:
        result, orphans = run(store, objects, [f"k/{i}" for i in range(25)], MEMORY_LIMITS=("1MB", "256MB"))
    assert [call.args[1] for call in connected.call_args_list] == ["1MB", "256MB"]
    assert_matches_reference(result, orphans, objects, [f"k/{i}" for i in range(25)], ())


def test_a_diff_that_overruns_every_budget_fails(store: ManifestStore) -> None:
    with pytest.raises(duckdb.OutOfMemoryException):
        run(store, [Obj("a")], ["a"], MEMORY_LIMITS=("1MB", "1MB"))
    assert not (Path(store.root) / "orphans").exists()


def test_a_failing_diff_leaves_no_spill_files_and_no_manifest(store: ManifestStore, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    objects = [Obj(f"k/{i}") for i in range(50)]
    with mock.patch.object(ManifestStore, "put_file", side_effect=RuntimeError("boom")), pytest.raises(RuntimeError):
        run(store, objects, [f"k/{i}" for i in range(25)], work_dir=str(work))
    assert list(work.iterdir()) == []
    assert not (Path(store.root) / "orphans").exists()


def test_an_unreadable_manifest_is_named_in_a_clear_error(store: ManifestStore, tmp_path: Path) -> None:
    references_uri = store.new_uri("references", "bkt", AS_OF, "run00000")
    store.write_table(references_uri, pa.table({"key": ["a"], "source": ["s"]}, schema=REFERENCES_SCHEMA))
    missing = store.new_uri("inventory", "bkt", AS_OF, "run00000")
    with pytest.raises(ManifestError, match=r"cannot read manifest .*re-materialize"):
        compute_orphan_diff(bucket=policy(), store=store, inventory_uri=missing, references_uri=references_uri,
                            as_of=AS_OF, run_id="run00000")


def test_diff_reads_and_writes_an_s3_store(seaweed: SeaweedFS, make_bucket: Callable[[str], str]) -> None:
    s3_store = ManifestStore(root=f"s3://{make_bucket('diffstore')}/m", s3=seaweed.settings())
    objects = [Obj(f"k/{i}.npy") for i in range(30)] + [Obj("k/3_metadata.json"), Obj("bad/../k")]
    references = [f"k/{i}.npy" for i in range(0, 30, 3)] + ["k/missing.npy"]
    result, orphans = run(s3_store, objects, references, rules=(SIDECAR,))
    assert result.manifest_uri.startswith("s3://")
    assert_matches_reference(result, orphans, objects, references, (SIDECAR,))


# --- equal to the reference implementation on random data ----------------------------------

SEGMENTS = st.sampled_from(["a", "b", "c.npy", "d.wav", "e_metadata.json", ".", "..", "", "ü", "x y", "%20"])
RAW_KEYS = st.builds(
    lambda lead, parts, ctl: ("/" if lead else "") + "/".join(parts) + ("\x07" if ctl else ""),
    st.booleans(), st.lists(SEGMENTS, min_size=1, max_size=4), st.integers(0, 30).map(lambda n: n == 0),
)
REF_KEYS = st.one_of(
    RAW_KEYS.map(lambda k: normalize_key(k) if _parseable(k) else "fallback/key"),
    st.sampled_from(["raw/a.wav", "raw/b/c.wav", "previews/a.mp3", "a/c_metadata.json"]),
)


def _parseable(key: str) -> bool:
    try:
        normalize_key(key)
    except InvalidKeyError:
        return False
    return True


# S3 keys are never empty (and an empty listed key is the one thing normalize_key and the
# fast path disagree on).
LISTED_KEYS = st.one_of(RAW_KEYS.filter(bool), st.sampled_from(["raw/a.wav", "previews/a.mp3", "previews/b/c.mp3"]))
OBJECTS = st.lists(
    st.builds(Obj, key=LISTED_KEYS,
              size=st.integers(0, 10_000),
              last_modified=st.integers(-5 * 24, 120 * 24).map(lambda h: AS_OF - timedelta(hours=h, seconds=1))),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects=OBJECTS, references=st.lists(REF_KEYS, max_size=40), mode=st.sampled_from(list(MODES)),
       rules=st.sampled_from([(), (SIDECAR,), (SIDECAR, PREVIEW)]))
def test_matches_a_plain_in_memory_diff(objects: list[Obj], references: list[str], mode: str,
                                        rules: tuple[CompanionRule, ...]) -> None:
    with tempfile.TemporaryDirectory() as root:
        result, orphans = run(ManifestStore(root), objects, references, rules=rules, **MODES[mode])
    assert_matches_reference(result, orphans, objects, references, rules)
