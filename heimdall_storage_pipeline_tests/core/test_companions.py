"""Companion rules backwards: every key that derives a companion is among its computed owners."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heimdall_storage_pipeline.core.companions import NotInvertibleError, check_invertible, owners
from heimdall_storage_pipeline.core.keys import InvalidKeyError, normalize_key

SIDECAR = (r"^(.+)\.npy$", r"\1_metadata.json")
RULES = [
    SIDECAR,
    (r"^sessions/([^/]+)/(.+)\.npy$", r"meta/\2/\1.json"),
    (r"^(.+)$", r"\1.bak"),
    (r"^a(.*)b(.*)\.x$", r"\2-\1.y"),
    (r"^raw/(\d+)/(.+)$", r"thumbs/\1/\2\\small"),
]
# Key characters that stress the inversion: the rules' own literals, '/', and some Unicode.
TOKENS = [*"ab.-_/xyz0159", "npy", "json", "_metadata", "sessions/", "meta/", "thumbs/", "raw/", "é", "日",
          "\ue000", "𝄞", "-", "\\", "small", "bak"]
KEY_TEXT = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=10).map("".join)


def derive(rule: tuple[str, str], key: str) -> str | None:
    """What the diff keeps for a referenced ``key`` under ``rule`` (None when it does not match)."""
    match, companion = rule
    return re.sub(match, companion, key) if re.search(match, key) else None


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_referenced_key_is_an_owner_of_its_companion(rule: tuple[str, str], data: st.DataObject) -> None:
    key = data.draw(st.one_of(st.from_regex(rule[0], fullmatch=True), KEY_TEXT))
    companion = derive(rule, key)
    if companion is None:
        return
    try:
        if normalize_key(key) != key:
            return
    except InvalidKeyError:
        return
    found = owners(*rule, companion)
    assert found is not None and key in found


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
@settings(max_examples=300, deadline=None)
@given(candidate=KEY_TEXT)
def test_every_computed_owner_derives_the_candidate(rule: tuple[str, str], candidate: str) -> None:
    for owner in owners(*rule, candidate) or ():
        assert derive(rule, owner) == candidate


def test_the_sidecar_rule() -> None:
    assert owners(*SIDECAR, "sessions/t1/websdr_5_metadata.json") == {"sessions/t1/websdr_5.npy"}
    assert owners(*SIDECAR, "sessions/t1/websdr_5.npy") == set()
    assert owners(*SIDECAR, "_metadata.json") == set()  # (.+) needs one character


@pytest.mark.parametrize(
    ("match", "companion", "why"),
    [
        (r"(.+)\.npy$", r"\1.json", "anchored"),
        (r"^(.+)\.npy", r"\1.json", "anchored"),
        (r"^(.+)\.np.$", r"\1.json", "'.' outside a group"),
        (r"^(.+)\.(npy|npz)$", r"\1.json", r"does not use group(s) [2]"),
        (r"^(.+)\d\.npy$", r"\1.json", r"'\d' outside a group"),
        (r"^(?:x)(.+)$", r"\1.json", "'(?' group"),
        (r"^((a)b)\.npy$", r"\2.json", r"\2, which is not a top-level group"),
        (r"^(.+)\.npy$", r"\1\n.json", r"'\n' in the companion"),
    ],
)
def test_rules_whose_owner_cannot_be_told_are_refused(match: str, companion: str, why: str) -> None:
    with pytest.raises(NotInvertibleError, match=re.escape(why)):
        check_invertible(match, companion)


def test_groups_may_hold_any_pattern() -> None:
    check_invertible(r"^data/([^)(]+|\)x)/(.+)\.npy$", r"\2/\1.json")
    assert owners(r"^data/([^)(]+|\)x)/(.+)\.npy$", r"\2/\1.json", "f/)x.json") == {"data/)x/f.npy"}
