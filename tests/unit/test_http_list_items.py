"""Remembered message-list items: the same JSON as computed afresh, and bounded."""

from __future__ import annotations

import datetime as dt
import random

from httpapi.ids import FolderIds
from httpapi.views import ListItems, MessageBodies, summary
from storage.mime import parse_message
from storage.model import SEEN, Mailbox, MessageEntry, StoredMessage

# The folder of every message below (row id 3), named by its UIDVALIDITY.
IDS = FolderIds(1, [Mailbox(3, 1, "INBOX", random.randint(1, 2**31), 1, 1, None)])


def stored(uid: int, modseq: int = 1, flags: frozenset[str] = frozenset()) -> StoredMessage:
    raw = (
        f"From: Sender {uid} <s{uid}@remote.test>\r\nTo: a@example.test, b@example.test\r\n"
        f"Subject: =?utf-8?q?caf=C3=A9_{uid}?=\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n"
        + "body " * random.randint(1, 50)
    ).encode()
    entry = MessageEntry(
        mailbox_id=3, uid=uid, message_id=1000 + uid, flags=flags, modseq=modseq,
        internal_date=dt.datetime(2024, 1, 2, tzinfo=dt.UTC), size=len(raw),
        blob_key=f"{uid:064x}",
    )
    return StoredMessage(entry, parse_message(raw))


def test_a_remembered_item_is_the_summary_and_follows_the_modseq() -> None:
    items = ListItems()
    message = stored(random.randint(1, 10_000))
    for thread in (None, "t1", "t2"):
        assert items.item(message, thread, IDS) == summary(message, thread, IDS)
        assert list(items.item(message, thread, IDS)) == list(summary(message, thread, IDS))
    flagged = stored(message.entry.uid, modseq=2, flags=frozenset({SEEN}))
    flagged = StoredMessage(flagged.entry, message.parsed)
    assert items.item(flagged, None, IDS)["unread"] is False


def test_remembered_items_are_bounded() -> None:
    limit = random.randint(5, 40)
    items = ListItems(max_items=limit)
    for uid in range(1, limit * 3 + random.randint(1, 9)):
        items.item(stored(uid), None, IDS)
        assert len(items) <= limit


def test_kept_message_bodies_are_bounded_by_their_text() -> None:
    """However many and however large the messages read, the kept content
    stays under its byte budget; one over the per-item cap is not kept."""
    budget = random.randint(2_000, 20_000)
    bodies = MessageBodies(max_bytes=budget, max_item=budget // 2)
    for n in range(random.randint(50, 120)):
        content = {"text": "x" * random.randint(0, budget), "headers": [["Subject", str(n)]]}
        bodies.put(f"{n:064x}", content)
        assert bodies.held <= budget
        kept = bodies.get(f"{n:064x}")
        assert kept is None or kept == content
    huge = {"text": "y" * (budget // 2 + 1)}
    bodies.put("f" * 64, huge)
    assert bodies.get("f" * 64) is None
