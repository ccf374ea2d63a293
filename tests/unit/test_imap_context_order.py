"""RFC 5267 contexts without a server: PARTIAL ranges (RFC 9394 section 3.1),
and SORT contexts kept by binary insertion in exactly SORT's order, with
ADDTO/REMOVEFROM positions a client can apply, in work that does not grow
with the square of the result count."""

from __future__ import annotations

import random

import pytest

from imapd.imap.commands.sort import sorted_uids
from imapd.imap.contexts import (
    UpdateContext,
    distinct_criteria,
    partial_item,
    partial_slice,
    sort_key_values,
)
from storage import search as q
from storage.model import Address
from storage.sortrows import SortRow
from tests.linearity import GROWTH_FACTOR, MAX_RATIO, best_time

RESULTS = [3, 5, 8, 13, 21, 34, 55]

# (range, results it names, the PARTIAL item), RFC 5267 section 4.4 and
# RFC 9394 section 3.1: 1 is the first, -1 the last; either order; past
# the end gives what there is, or NIL.
PARTIAL_CASES = [
    ((1, 3), [3, 5, 8], b"PARTIAL (1:3 3,5,8)"),
    ((3, 1), [3, 5, 8], b"PARTIAL (3:1 3,5,8)"),
    ((6, 10), [34, 55], b"PARTIAL (6:10 34,55)"),
    ((7, 7), [55], b"PARTIAL (7:7 55)"),
    ((8, 4294967295), [], b"PARTIAL (8:4294967295 NIL)"),
    ((1, 4294967295), RESULTS, b"PARTIAL (1:4294967295 3,5,8,13,21,34,55)"),
    ((-1, -1), [55], b"PARTIAL (-1:-1 55)"),
    ((-1, -3), [21, 34, 55], b"PARTIAL (-1:-3 21,34,55)"),
    ((-3, -1), [21, 34, 55], b"PARTIAL (-3:-1 21,34,55)"),
    ((-6, -100), [3, 5], b"PARTIAL (-6:-100 3,5)"),
    ((-7, -4294967295), [3], b"PARTIAL (-7:-4294967295 3)"),
    ((-8, -9), [], b"PARTIAL (-8:-9 NIL)"),
]


@pytest.mark.parametrize(("rng", "want", "item"), PARTIAL_CASES)
def test_partial_ranges(rng: tuple[int, int], want: list[int], item: bytes) -> None:
    assert list(partial_slice(RESULTS, rng)) == want
    assert partial_item(RESULTS, rng) == item
    assert partial_item([], rng).endswith(b" NIL)")


def _rows(rng: random.Random, uids: list[int]) -> list[SortRow]:
    """Rows with many ties (few dates, sizes, subjects, senders)."""
    out = []
    for uid in uids:
        sender = rng.choice(["ann", "Bob", "bob", "carl"])
        out.append(
            SortRow(
                uid=uid,
                internal_date=float(rng.choice([100, 200, 300])),
                size=rng.choice([10, 20, 30, 40]),
                sent_date=rng.choice([None, 150.0, 250.0]),
                subject=rng.choice(["a", "Re: a", "b", "[x] B", "Fwd: c", ""]),
                from_=(Address(sender.title(), None, sender, "example.net"),),
                to=(Address(None, None, rng.choice(["x", "y"]), "example.org"),),
                cc=(),
                message_id=None,
                in_reply_to=None,
                references=(),
            )
        )
    return out


def _criteria(rng: random.Random) -> tuple[tuple[str, bool], ...]:
    keys = ["ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM"]
    return tuple((rng.choice(keys), rng.random() < 0.5) for _ in range(rng.randint(1, 4)))


def _context(rows: list[SortRow], criteria: tuple[tuple[str, bool], ...]) -> UpdateContext:
    distinct = distinct_criteria(criteria)
    ctx = UpdateContext("T", True, q.All(), distinct)
    keys = frozenset(name for name, _ in criteria)
    ordered = sorted_uids(rows, keys, criteria)
    values = dict(zip((r.uid for r in rows), sort_key_values(rows, distinct), strict=True))
    ctx.fill((), [ctx.key(u, values[u]) for u in ordered])
    return ctx


def _apply(mirror: list[int], pairs: list[tuple[int, list[int]]], add: bool) -> None:
    """What a client does with ADDTO / REMOVEFROM pairs (RFC 5267 4.3.3-4.3.4)."""
    for pos, uids in pairs:
        if add:
            mirror[pos - 1 : pos - 1] = uids
        else:
            assert mirror[pos - 1 : pos - 1 + len(uids)] == uids
            del mirror[pos - 1 : pos - 1 + len(uids)]


@pytest.mark.parametrize("seed", range(30))
def test_sort_context_keeps_sort_order(seed: int) -> None:
    """Random criteria, random batches in and out (both the one-by-one and
    the merge paths): the context is always what SORT of its members gives,
    and the positions it reports rebuild it on the client's side."""
    rng = random.Random(seed * 7919 + random.randrange(1 << 30))
    criteria = _criteria(rng)
    keys = frozenset(name for name, _ in criteria)
    uids = rng.sample(range(1, 500), rng.randint(0, 120))
    rows = {r.uid: r for r in _rows(rng, uids)}
    ctx = _context(sorted(rows.values()), criteria)
    mirror = [k.uid for k in ctx.order]
    next_uid = 500
    for _ in range(8):
        if rng.random() < 0.5:
            count = rng.choice([1, 3, 40, 90])
            new = list(range(next_uid, next_uid + count))
            next_uid += count
            fresh = {r.uid: r for r in _rows(rng, new)}
            values = sort_key_values(list(fresh.values()), ctx.sort or ())
            made = {u: ctx.key(u, v) for u, v in zip(fresh, values, strict=True)}
            _apply(mirror, ctx.insert(rng.sample(new, len(new)), made), add=True)
            rows.update(fresh)
        else:
            gone = set(rng.sample(sorted(rows), min(len(rows), rng.choice([1, 5, 60]))))
            gone.add(99_999)  # not a member: ignored
            _apply(mirror, ctx.delete(gone), add=False)
            for u in gone:
                rows.pop(u, None)
        want = sorted_uids(sorted(rows.values()), keys, criteria)
        assert [k.uid for k in ctx.order] == want, criteria
        assert mirror == want
        assert len(ctx) == len(rows) and all(u in ctx for u in rows)


def test_search_context_positions_are_zero_and_sets_ascending() -> None:
    ctx = UpdateContext("T", False, q.All(), None)
    ctx.fill([2, 4, 6])
    assert ctx.insert([9, 5], {}) == [(0, [5, 9])]
    assert list(ctx.uids) == [2, 4, 5, 6, 9]
    assert ctx.delete({4, 9, 10}) == [(0, [4, 9])]
    many = list(range(100, 200))
    assert ctx.insert(many, {}) == [(0, many)]
    assert list(ctx.uids) == [2, 5, 6, *many]
    assert ctx.delete(set(many)) == [(0, many)]
    assert list(ctx.uids) == [2, 5, 6]


def _batch_work(n: int) -> None:
    """A context of n results takes n/2 new ones in one batch, then loses n/2."""
    rng = random.Random(n)
    criteria = (("SIZE", True), ("SUBJECT", False))
    rows = _rows(rng, list(range(1, n + 1)))
    ctx = _context(rows, criteria)
    new = _rows(rng, list(range(n + 1, n + n // 2 + 1)))
    values = sort_key_values(new, ctx.sort or ())
    ctx.insert(
        [r.uid for r in new], {r.uid: ctx.key(r.uid, v) for r, v in zip(new, values, strict=True)}
    )
    ctx.delete(set(range(1, n + 1, 2)))


def _single_work(n: int) -> None:
    """n new results arrive one at a time (ADDTO per message): each is
    placed by binary search, not by sorting the context again."""
    rng = random.Random(n)
    ctx = _context(_rows(rng, list(range(1, 2001))), (("DATE", False),))
    for row in _rows(rng, list(range(3000, 3000 + n))):
        (v,) = sort_key_values([row], ctx.sort or ())
        ctx.insert([row.uid], {row.uid: ctx.key(row.uid, v)})


@pytest.mark.parametrize("work", [_batch_work, _single_work])
def test_context_changes_grow_linearly(work) -> None:  # type: ignore[no-untyped-def]
    small = best_time(lambda: work(600))
    big = best_time(lambda: work(600 * GROWTH_FACTOR))
    assert big / max(small, 1e-4) < MAX_RATIO, (small, big)
    assert big < 2.0, big  # 4,800 results: well under a second of CPU
