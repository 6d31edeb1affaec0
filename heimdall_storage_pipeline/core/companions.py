"""Companion rules backwards: which keys, if referenced, keep a candidate.

The diff keeps ``rule(r)`` for every referenced key ``r`` (a recording keeps its sidecar). At
delete time the question is the inverse: does any key referenced *now* derive this candidate?
Its possible owners are computed from the rule and re-checked with the candidate itself, so a
recording referenced between scan and delete keeps its sidecar. That needs rules whose owner
follows from the companion: ``match`` is ``^literal(group)literal...$`` and ``companion`` uses
every group (``\\1``..``\\9``); ``check_invertible`` refuses anything else when the policy loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from heimdall_storage_pipeline.core.keys import InvalidKeyError, normalize_key

if TYPE_CHECKING:
    from heimdall_storage_pipeline.core.policy import CompanionRule

_METACHARACTERS = set(".^$*+?{}[]|()")
_TEMPLATE_PART = re.compile(r"\\(\d)|\\\\|\\(.)|([^\\]+)", re.DOTALL)
MAX_PARSES = 256  # owner spellings tried per candidate and rule; beyond this the candidate is kept


class NotInvertibleError(ValueError):
    """A companion rule whose owner cannot be computed from a companion key."""


@dataclass(frozen=True)
class _Inverse:
    literals: tuple[str, ...]  # the match's literal text around its top-level groups (groups + 1 parts)
    template: tuple[str | int, ...]  # the companion: literal text, or a group number


def _group_end(pattern: str, start: int) -> int:
    """Index just past the ``)`` closing the group that opens at ``pattern[start]``."""
    depth, index, in_class = 0, start, False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern[index + 1:index + 2] == "]" or pattern[index + 1:index + 3] == "^]":
                index += 2 if pattern[index + 1] == "]" else 3  # a leading ']' is a member, not the end
                continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise NotInvertibleError("an unbalanced '('")


def _match_parts(pattern: str) -> tuple[list[str], list[int]]:
    """The literal texts around the top-level capturing groups, and those groups' numbers."""
    if not (pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")):
        raise NotInvertibleError("it must be anchored: '^...$'")
    body, literals, groups = pattern[1:-1], [""], []
    number, index = 0, 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            escaped = body[index + 1:index + 2]
            if not escaped or escaped.isalnum():
                raise NotInvertibleError(f"'\\{escaped}' outside a group is not a literal character")
            literals[-1] += escaped
            index += 2
        elif char == "(":
            if body[index + 1:index + 2] == "?":
                raise NotInvertibleError("a '(?' group outside a capturing group")
            end = _group_end(body, index)
            number += 1
            groups.append(number)
            # Capturing groups nested in this one are numbered too; the companion may not use them.
            number += re.compile(body[index + 1:end - 1]).groups
            literals.append("")
            index = end
        elif char in _METACHARACTERS:
            raise NotInvertibleError(f"'{char}' outside a group; only literal text may surround the groups")
        else:
            literals[-1] += char
            index += 1
    return literals, groups


@cache
def _inverse(match: str, companion: str) -> _Inverse:
    literals, groups = _match_parts(match)
    template: list[str | int] = []
    for part in _TEMPLATE_PART.finditer(companion):
        if part.group(1) is not None:
            group = int(part.group(1))
            if group not in groups:
                raise NotInvertibleError(f"the companion uses \\{group}, which is not a top-level group of 'match'")
            template.append(group)
        elif part.group(2) is not None:
            raise NotInvertibleError(f"'\\{part.group(2)}' in the companion; only \\1..\\9 and \\\\ are allowed")
        else:
            template.append("\\" if part.group(0) == "\\\\" else part.group(0))
    unused = sorted(set(groups) - {part for part in template if isinstance(part, int)})
    if unused:
        raise NotInvertibleError(f"the companion does not use group(s) {unused}, so it does not tell its owner")
    # Group numbers are re-based to the top-level groups' positions.
    position = {group: index for index, group in enumerate(groups)}
    return _Inverse(tuple(literals), tuple(position[p] if isinstance(p, int) else p for p in template))


def check_invertible(match: str, companion: str) -> None:
    """Raise ``NotInvertibleError`` (saying why) unless a companion's owner can be computed."""
    _inverse(match, companion)


def _parses(key: str, template: tuple[str | int, ...]) -> list[dict[int, str]]:
    """Every assignment of group values that makes ``template`` spell ``key`` (at most MAX_PARSES + 1)."""
    found: list[dict[int, str]] = []

    def walk(part: int, position: int, values: dict[int, str]) -> None:
        if len(found) > MAX_PARSES:
            return
        if part == len(template):
            if position == len(key):
                found.append(dict(values))
            return
        piece = template[part]
        if isinstance(piece, str) or piece in values:
            text = piece if isinstance(piece, str) else values[piece]
            if key.startswith(text, position):
                walk(part + 1, position + len(text), values)
            return
        for end in range(position, len(key) + 1):
            values[piece] = key[position:end]
            walk(part + 1, end, values)
        del values[piece]

    walk(0, 0, {})
    return found


def owners(match: str, companion: str, key: str) -> set[str] | None:
    """The keys whose companion under this rule is ``key``; None when there are too many to tell."""
    inverse = _inverse(match, companion)
    parses = _parses(key, inverse.template)
    if len(parses) > MAX_PARSES:
        return None
    rule = re.compile(match)
    found: set[str] = set()
    for values in parses:
        owner = inverse.literals[0] + "".join(
            values[group] + inverse.literals[group + 1] for group in range(len(inverse.literals) - 1))
        # The owner must really derive ``key`` (its own groups may split differently) and be a key.
        matched = rule.search(owner)
        if matched and matched.expand(companion) == key and _is_normal(owner):
            found.add(owner)
    return found


def owners_under(rules: Iterable[CompanionRule], key: str) -> set[str] | None:
    """The keys that keep ``key`` as their companion under any of ``rules``; None: too many to tell."""
    found: set[str] = set()
    for rule in rules:
        by_rule = owners(rule.match, rule.companion, key)
        if by_rule is None:
            return None
        found |= by_rule
    return found


def _is_normal(key: str) -> bool:
    try:
        return normalize_key(key) == key
    except InvalidKeyError:
        return False
