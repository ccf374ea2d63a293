"""NotifyState (imapd.imap.notify) on its own: the matching rules of RFC
5465 sections 3 and 6, overflow when the bus lost changes (section 5.8),
and a change's cost independent of how many mailboxes the account has."""

from __future__ import annotations

import datetime as dt

from imapd.imap.notify import NotifyState
from imapd.imap.wire.commands import Notify
from imapd.imap.wire.parser import parse_line
from storage.model import Change, ChangeKind, Mailbox
from storage.sql.metadata import METADATA_CHANGE_CHARS, _some
from tests.linearity import best_time

_AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _state(groups: str, names: list[str], subscribed: frozenset[str] = frozenset()) -> NotifyState:
    cmd = parse_line(f"t NOTIFY SET {groups}".encode())
    assert isinstance(cmd, Notify), cmd
    boxes = [Mailbox(i + 1, 1, n, 1, 1, 1, None) for i, n in enumerate(names)]
    return NotifyState(cmd.groups, boxes, set(subscribed))


def _new(box: int, uid: int = 1) -> Change:
    return Change(uid, 1, ChangeKind.NEW, box, uid, uid, _AT, {"flags": []})


def test_first_matching_group_decides_and_none_stops() -> None:
    """Section 3: groups in order; a NONE group ends the search."""
    st = _state(
        "(mailboxes Lists/quiet NONE) (subtree Lists (MessageNew MessageExpunge)) "
        "(subscribed (MailboxName)) (inboxes (MessageNew MessageExpunge))",
        ["INBOX", "Lists", "Lists/a", "Lists/quiet", "Listsx", "Junk"],
        frozenset({"Listsx"}),
    )
    assert st.wants("Lists/a/b", "MessageNew")
    assert st.wants("Lists", "MessageExpunge")
    assert not st.wants("Lists/quiet", "MessageNew")
    assert not st.wants("Listsx", "MessageNew")  # a prefix is no subtree
    assert st.wants("Listsx", "MailboxName")  # subscribed
    assert st.wants("Junk", "MessageNew") and st.wants("INBOX", "MessageNew")  # inboxes
    assert not st.wants("Other", "MessageNew")


def test_selected_mailbox_message_events_only_through_selected() -> None:
    """Section 6.1: the selected mailbox's message events go to the
    SELECTED group (news for the session's sync), not PERSONAL's STATUS."""
    st = _state("(personal (MessageNew MessageExpunge))", ["INBOX", "Work"])
    assert not st.offer(_new(1), selected_id=1)
    assert not st.queue
    assert st.offer(_new(2), selected_id=1)
    assert list(st.queue) == [("status", 2)]
    st2 = _state("(selected (MessageNew MessageExpunge))", ["INBOX"])
    assert st2.offer(_new(1), selected_id=1) and st2.selected_news


def test_status_news_is_coalesced_per_mailbox() -> None:
    st = _state("(personal (MessageNew MessageExpunge FlagChange))", ["Work"])
    for uid in range(1, 500):
        st.offer(_new(1, uid), None)
    assert st.queue == {("status", 1): {"MessageNew"}}


def test_lost_changes_are_an_overflow() -> None:
    """Section 5.8: once the bus dropped changes, what was lost cannot be
    told; the session overflows rather than stay silently behind."""
    st = _state("(personal (MessageNew MessageExpunge))", ["Work"])
    st.offer(_new(1), None, dropped=3)  # what was lost before NOTIFY SET
    assert not st.overflowed
    st.offer(_new(1, 2), None, dropped=4)
    assert st.overflowed and not st.queue and st.ready.is_set()


def test_a_change_costs_the_same_for_ten_or_a_hundred_thousand_mailboxes() -> None:
    """No work per change proportional to the account's mailboxes."""
    groups = (
        "(subscribed (MessageNew MessageExpunge)) (subtree (a b c) (MessageNew MessageExpunge))"
    )

    def cost(n: int) -> float:
        st = _state(
            groups, [f"box{i}" for i in range(n)], frozenset(f"box{i}" for i in range(0, n, 2))
        )
        changes = [_new(i % n + 1, i) for i in range(20_000)]

        def work() -> None:
            st.queue.clear()
            for ch in changes:
                st.offer(ch, None)

        return best_time(work)

    small, big = cost(10), cost(100_000)
    assert big < small * 4 + 0.05, (small, big)


def test_metadata_change_names_stay_small() -> None:
    names = [f"/private/{'x' * 900}{i}" for i in range(10)]
    kept = _some(names)
    assert kept == names[: len(kept)] and 1 <= len(kept) < len(names)
    assert sum(len(n) for n in kept) <= METADATA_CHANGE_CHARS
    assert _some(["/private/" + "y" * 3000]) == ["/private/" + "y" * 3000]
