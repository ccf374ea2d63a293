"""Session-side pure logic: sequence numbers and FETCH section ranges."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapd.imap import mailbox_view
from imapd.imap.commands.fetch import filter_header, find_part, section_range
from imapd.imap.mailbox_view import BadSequence, MailboxView
from imapd.imap.wire.commands import Section
from imapd.imap.wire.parser import parse_sequence_set
from storage.mime import parse_message
from storage.model import Mailbox, MessageEntry
from tests.protocol.imap.messages import FORWARD, MULTIPART, PLAIN


def _view(uids: list[int]) -> MailboxView:
    box = Mailbox(1, 1, "INBOX", 7, max(uids, default=0) + 1, 1, None)
    now = dt.datetime.now(dt.UTC)
    entries = [MessageEntry(1, u, u, frozenset(), 1, now, 10, "k") for u in uids]
    return MailboxView.from_entries(box, False, entries, 1)


@pytest.mark.parametrize(("seqset", "uid", "expected"), [
    (b"1:*", False, [3, 5, 9, 20]),
    (b"2,4", False, [5, 20]),
    (b"*:3", False, [9, 20]),
    (b"1:*", True, [3, 5, 9, 20]),
    (b"4:9", True, [5, 9]),
    (b"100:*", True, [20]),  # RFC 3501 6.4.8: n:* includes the highest UID
    (b"6:8", True, []),
    (b"9,3,9", True, [3, 9]),
])
def test_resolve(seqset: bytes, uid: bool, expected: list[int]) -> None:
    assert _view([3, 5, 9, 20]).resolve(parse_sequence_set(seqset), uid) == expected


def test_resolve_out_of_range_sequence_numbers() -> None:
    view = _view([3, 5])
    with pytest.raises(BadSequence):
        view.resolve(parse_sequence_set(b"3"), uid=False)
    assert view.resolve(parse_sequence_set(b"2:9"), uid=False, strict=False) == [5]
    with pytest.raises(BadSequence):
        _view([]).resolve(parse_sequence_set(b"1:*"), uid=False)


def test_remove_announces_highest_first() -> None:
    view = _view([3, 5, 9, 20])
    assert view.remove({5, 20}) == [4, 2]
    assert list(view.uids) == [3, 9] and view.seq_of(9) == 2 and view.seq_of(5) is None


def _slice(raw: bytes, section: Section) -> bytes | None:
    rng = section_range(parse_message(raw).body, section)
    return None if rng is None else raw[rng[0] : rng[1]]


def test_sections_of_a_plain_message() -> None:
    assert _slice(PLAIN, Section()) == PLAIN
    assert _slice(PLAIN, Section((), "TEXT")) == b"Shall we meet at noon?\r\n"
    assert _slice(PLAIN, Section((1,))) == b"Shall we meet at noon?\r\n"
    header = _slice(PLAIN, Section((), "HEADER"))
    assert header is not None and header.endswith(b"X-Mood: hungry\r\n\r\n")
    assert _slice(PLAIN, Section((2,))) is None


def test_sections_of_nested_messages() -> None:
    assert _slice(MULTIPART, Section((1,))) == b"See the quarterly numbers."
    assert _slice(MULTIPART, Section((2,))) == b"AAECAwQFBgcICQ=="
    mime = _slice(MULTIPART, Section((2,), "MIME"))
    assert mime is not None and mime.startswith(b"Content-Type: application/octet-stream")
    assert _slice(FORWARD, Section((2,), "HEADER")) == (
        b"From: Grace <grace@example.org>\r\nSubject: old news\r\n\r\n")
    assert _slice(FORWARD, Section((2, 1))) == b"Inner body."
    assert _slice(FORWARD, Section((2,), "TEXT")) == b"Inner body."
    assert _slice(FORWARD, Section((1, 1))) is None
    root = parse_message(FORWARD).body
    assert find_part(root, (2,)) is not None and find_part(root, (3,)) is None


def test_filter_header_keeps_continuations() -> None:
    header = b"Subject: a\r\n b\r\nFrom: x\r\nX-Y: z\r\n\r\n"
    assert filter_header(header, ["subject"], True) == b"Subject: a\r\n b\r\n\r\n"
    assert filter_header(header, ["SUBJECT", "from"], False) == b"X-Y: z\r\n\r\n"
    assert filter_header(header, ["none"], True) == b"\r\n"


@settings(max_examples=200, deadline=None)
@given(
    uids=st.lists(st.integers(1, 3000), unique=True, max_size=400).map(sorted),
    data=st.data(),
)
def test_remove_matches_a_list(uids: list[int], data: st.DataObject) -> None:
    """Expunging any subset (a few UIDs one by one, many in one pass) gives
    the sequence numbers and the order a plain list gives."""
    view = _view(uids)
    gone = set(data.draw(st.lists(st.sampled_from(uids), max_size=len(uids)) if uids
                         else st.just([])))
    gone.add(data.draw(st.integers(1, 3000)))  # a UID not in the view is ignored
    expected = sorted((i + 1 for i, u in enumerate(uids) if u in gone), reverse=True)
    assert view.remove(gone) == expected
    assert list(view.uids) == [u for u in uids if u not in gone]
    assert set(view.entries) == set(view.uids)


def test_a_lazy_view_reads_only_what_it_is_asked() -> None:
    """A view made from a snapshot holds UIDs only; entries come in per
    command (missing/load) and updates reach read and unread ones alike."""
    from array import array

    from storage.model import MailboxSnapshot

    uids = sorted(random.sample(range(1, 50_000), random.randint(50, 400)))
    box = Mailbox(1, 1, "INBOX", 7, uids[-1] + 1, 1, None)
    snapshot = MailboxSnapshot(array("I", uids), uids[3], ("$Work",))
    view = MailboxView.from_snapshot(box, False, snapshot, 1)
    assert view.exists == len(uids) and not view.entries and view.keywords == {"$Work"}
    now = dt.datetime.now(dt.UTC)
    some = random.sample(uids, 10)
    assert sorted(view.missing(some)) == sorted(some)
    view.load([MessageEntry(1, u, u, frozenset({"$New"}), 2, now, 10, "k") for u in some])
    assert view.missing(some) == [] and view.unannounced == {"$New"}
    outside = uids[-1] + 7
    view.update(MessageEntry(1, outside, 1, frozenset(), 3, now, 10, "k"))
    assert outside not in view.entries  # not in the snapshot: ignored
    unread = next(u for u in uids if u not in view.entries)
    view.update(MessageEntry(1, unread, 1, frozenset({"\\Seen"}), 3, now, 10, "k"))
    assert view.entries[unread].flags == {"\\Seen"}


def _entry(message_id: int, raw: bytes) -> MessageEntry:
    import hashlib

    now = dt.datetime.now(dt.UTC)
    key = hashlib.sha256(raw).hexdigest()
    return MessageEntry(1, message_id, message_id, frozenset(), 1, now, len(raw), key)


@given(st.binary(min_size=1, max_size=3000), st.binary(min_size=1, max_size=3000))
@settings(max_examples=50)
def test_message_cache_never_answers_for_a_reused_row_id(old: bytes, new: bytes) -> None:
    """Issue #17: SQLite reuses a deleted message row's id; the cache must
    not give the old message's bytes or parsed form for the new one."""
    cache = mailbox_view.MessageCache()
    before, after = _entry(7, old), _entry(7, new)
    cache.put_raw(before, old)
    cache.put_parsed(before, parse_message(old))
    assert cache.raw(before) == old
    if old == new:  # the same content under the same row: the same message
        assert cache.raw(after) == new
        return
    assert cache.raw(after) is None
    assert cache.parsed(after) is None
    cache.put_raw(after, new)
    assert cache.raw(after) == new


def test_message_cache_checks_the_size() -> None:
    raw = b"Subject: s\r\n\r\n" + bytes(range(256)) * 3
    entry = _entry(3, raw)
    cache = mailbox_view.MessageCache()
    cache.put_raw(entry, raw[:-1])  # a short read is not kept
    assert cache.raw(entry) is None
    cache.put_parsed(entry, parse_message(raw))
    wrong = MessageEntry(1, 3, 3, frozenset(), 1, entry.internal_date, len(raw) + 1,
                         entry.blob_key)
    assert cache.parsed(wrong) is None
    assert cache.parsed(entry) is None  # the stale item went with the miss
    cache.put_parsed(entry, parse_message(raw))
    assert cache.parsed(entry) is not None


def test_every_session_cache_together_stays_within_the_process_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue #24: each session's cache has its own bound (2 MiB), but a
    thousand sessions that each fetched a little and went idle must not
    hold a thousand times that: together they stay within
    PROCESS_CACHE_BYTES, and a cache that is cleared gives its share back."""
    budget = 256 * 1024
    monkeypatch.setattr(mailbox_view, "PROCESS_CACHE_BYTES", budget)
    monkeypatch.setattr(mailbox_view.MessageCache, "process_bytes", 0)
    rng = random.Random(24)
    caches = [mailbox_view.MessageCache() for _ in range(40)]
    kept = []
    for n, cache in enumerate(caches):
        for i in range(8):
            raw = b"Subject: m\r\n\r\n" + rng.randbytes(rng.randrange(1000, 30_000))
            entry = _entry(n * 100 + i, raw)
            cache.put_raw(entry, raw)
            if cache.raw(entry) is not None:
                kept.append((cache, entry, raw))
            held = sum(c.size for c in caches)
            assert held <= budget
            assert held == mailbox_view.MessageCache.process_bytes
    # What a cache still answers is the message's bytes, nothing else.
    for cache, entry, raw in kept:
        assert cache.raw(entry) in (None, raw)
    assert sum(c.size for c in caches) > budget // 2  # the budget is used, not refused
    for cache in caches:
        cache.clear()
        assert cache.size == 0
    assert mailbox_view.MessageCache.process_bytes == 0
    # With the budget given back, a new session caches again.
    raw = b"Subject: again\r\n\r\nbody\r\n"
    fresh = mailbox_view.MessageCache()
    fresh.put_raw(_entry(9999, raw), raw)
    assert fresh.raw(_entry(9999, raw)) == raw
