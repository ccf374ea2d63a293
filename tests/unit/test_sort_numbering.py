"""The numbers a SORT from stored keys answers with (issue #24:
imapd.imap.commands.sort._numbered, C loops over a UID table or a dict):
for random views (dense UIDs, UIDs far apart), random matches, and a
stored order holding UIDs the view does not have (arrived since) and
lacking some it has (expunged since), they are the matches' UIDs or
sequence numbers (RFC 3501 section 2.3.1), in the stored order, as a
plain position lookup gives them."""

from __future__ import annotations

import random
from array import array

import pytest

from imapd.imap.commands.sort import _numbered, _numbers, _sort_line
from imapd.imap.mailbox_view import MailboxView
from storage.model import Mailbox


def _view(uids: list[int]) -> MailboxView:
    box = Mailbox(1, 1, "INBOX", 1, uids[-1] + 1, 1, None)
    view = MailboxView(box, read_only=True)
    view.uids = array("I", uids)
    return view


@pytest.mark.parametrize("seed", range(40))
def test_numbers_are_the_positions_in_stored_order(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice((1, 2, rng.randint(3, 50), rng.randint(2000, 20000)))
    gap = rng.choice((1, 1, 3, 1000, 10**6))  # 1000 and up: the dict, not the table
    start = rng.randint(1, 10**6)
    gap = min(gap, (2**32 - 100 - start) // (n + 1))  # UIDs are 32-bit (RFC 3501 section 2.3.1.1)
    uids = sorted({start + rng.randrange(n * gap + 1) for _ in range(n)})
    view = _view(uids)
    if rng.random() < 0.4:
        matches = list(uids)
    else:
        matches = sorted(rng.sample(uids, rng.randint(1, len(uids))))
    stored = [u for u in uids if rng.random() < 0.95]  # some expunged meanwhile
    stored += [uids[-1] + k for k in range(1, rng.randint(1, 20))]  # arrived meanwhile
    stored += [u for u in range(max(1, start - 5), start)]  # UIDs below the view's
    rng.shuffle(stored)
    seq = {u: i for i, u in enumerate(uids, 1)}
    wanted = set(matches)
    kept = [u for u in stored if u in wanted]
    assert _numbered(view, matches, stored, uid=True) == kept
    assert _numbered(view, matches, stored, uid=False) == [seq[u] for u in kept]
    order = rng.sample(matches, len(matches))
    assert _numbers(view, order, uid=False) == [seq[u] for u in order]


def test_nothing_matches_or_nothing_stored() -> None:
    view = _view([3, 5, 9])
    assert _numbered(view, [], [9, 3], uid=False) == []
    assert _numbered(view, [3], [], uid=False) == []
    assert _sort_line([]) == b"* SORT\r\n"
    assert _sort_line([3, 1, 20]) == b"* SORT 3 1 20\r\n"
