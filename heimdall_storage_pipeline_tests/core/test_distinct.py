"""DistinctCounter counts what a set would, across batches and compactions."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core import distinct
from heimdall_storage_pipeline.core.distinct import DistinctCounter


@settings(deadline=None)
@given(batches=st.lists(st.lists(st.text(max_size=6), max_size=20), max_size=8))
def test_counts_distinct_strings_across_batches(batches: list[list[str]]) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(distinct, "_COMPACT_EVERY", 7)  # compact often
        counter = DistinctCounter()
        for batch in batches:
            counter.add(pa.array(batch, pa.string()))
        assert counter.count == len({key for batch in batches for key in batch})


def test_an_empty_counter_counts_zero() -> None:
    assert DistinctCounter().count == 0
