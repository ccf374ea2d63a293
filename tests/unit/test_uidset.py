"""UidSet (storage.model) and the SQL backends' UID matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.model import UidSet
from storage.sql.criteria import UidMatcher


def test_of_builds_sorted_disjoint_ranges() -> None:
    assert UidSet.of([5, 1, 2, 3, 9, 10, 2]).ranges == ((1, 3), (5, 5), (9, 10))
    assert UidSet.of([]).is_empty()


def test_from_ranges_normalises() -> None:
    s = UidSet.from_ranges([(9, 7), (1, 2), (3, 4), (20, None), (25, 30)])
    assert s.ranges == ((1, 4), (7, 9), (20, None))


def test_all_and_contains() -> None:
    s = UidSet.all()
    assert 1 in s and 10**9 in s and 0 not in s
    assert "1" not in s


def test_iter_bounded_caps_open_ranges() -> None:
    assert list(UidSet(((3, None),)).iter_bounded(5)) == [3, 4, 5]
    assert list(UidSet.of([1, 4, 8]).iter_bounded(5)) == [1, 4]


@pytest.mark.parametrize(
    ("ranges", "max_uid", "inside", "outside"),
    [
        (((1, 3), (7, 7)), 10, [1, 2, 3, 7], [0, 4, 6, 8]),
        (((4, None),), 10, [4, 10, 11], [3]),
        # "n:*" with n past the highest UID still names the highest (RFC 3501 section 9).
        (((50, None),), 10, [10, 50], [9]),
        (((1, 10), (3, 4)), None, [1, 5, 10], [11]),
    ],
)
def test_uid_matcher(ranges, max_uid, inside, outside) -> None:
    m = UidMatcher(UidSet(ranges), max_uid)
    assert all(u in m for u in inside)
    assert not any(u in m for u in outside)


@given(st.lists(st.tuples(st.integers(1, 200), st.integers(1, 200)), max_size=20))
def test_matcher_agrees_with_contains(pairs: list[tuple[int, int]]) -> None:
    s = UidSet.from_ranges(pairs)
    m = UidMatcher(s, None)
    for uid in range(0, 202):
        assert (uid in m) == (uid in s)
