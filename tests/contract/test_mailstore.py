"""MailStore contract on every SQL backend: mailboxes, UIDs, flags, search,
copy/move/expunge, CONDSTORE/QRESYNC data, quota, \\Recent, leases, the
change log and event publication, and UID allocation under concurrency."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import random

import pytest

from storage.backend import SqlStorage
from storage.errors import ErrorKind, StorageError
from storage.model import (
    ANSWERED,
    DELETED,
    FLAGGED,
    SEEN,
    Account,
    ChangeKind,
    StoreMode,
    UidSet,
)
from storage.search import (
    All,
    And,
    Date,
    Flag,
    Header,
    ModSeq,
    Not,
    Or,
    Size,
    Text,
    Uids,
)
from tests.contract.mailfactory import deliver, store_message

UTC = dt.UTC


@pytest.fixture
async def bob(storage: SqlStorage) -> Account:
    await storage.directory.add_domain("example.org")
    return await storage.directory.add_account("bob@example.org", "pw")


async def inbox_id(storage: SqlStorage, account: Account, name: str = "INBOX") -> int:
    return (await storage.mail(account).get_mailbox(account.id, name)).id


# --- mailboxes -----------------------------------------------------------------


async def test_create_makes_parents_and_new_uidvalidity(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await mail.create_mailbox(bob.id, "Projects/2024/Q1")
    names = [m.name for m in await mail.list_mailboxes(bob.id)]
    assert {"Projects", "Projects/2024", "Projects/2024/Q1"} <= set(names)
    assert names[0] == "INBOX"
    assert box.uidnext == 1 and box.uidvalidity > 0
    with pytest.raises(StorageError) as err:
        await mail.create_mailbox(bob.id, "Projects")
    assert err.value.kind is ErrorKind.EXISTS
    with pytest.raises(StorageError) as err:
        await mail.create_mailbox(bob.id, "inbox")
    assert err.value.kind is ErrorKind.EXISTS
    for bad in ("", "/x", "x/", "a//b", "a\x00b", "x" * 1001):
        with pytest.raises(StorageError) as err:
            await mail.create_mailbox(bob.id, bad)
        assert err.value.kind is ErrorKind.INVALID
        # Looked up, a name no mailbox can have is one that does not exist.
        for lookup in (mail.get_mailbox, mail.delete_mailbox):
            with pytest.raises(StorageError) as err:
                await lookup(bob.id, bad)
            assert err.value.kind is ErrorKind.NOT_FOUND
        with pytest.raises(StorageError) as err:
            await mail.rename_mailbox(bob.id, bad, "Elsewhere")
        assert err.value.kind is ErrorKind.NOT_FOUND
    # A recreated name never reuses a UIDVALIDITY (RFC 3501 section 2.3.1.1).
    await mail.delete_mailbox(bob.id, "Projects/2024/Q1")
    again = await mail.create_mailbox(bob.id, "Projects/2024/Q1")
    assert again.uidvalidity != box.uidvalidity


async def test_inbox_is_case_insensitive(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    assert (await mail.get_mailbox(bob.id, "iNbOx")).name == "INBOX"
    child = await mail.create_mailbox(bob.id, "inbox/Sub")
    assert child.name == "INBOX/Sub"
    with pytest.raises(StorageError) as err:
        await mail.get_mailbox(bob.id, "sent")  # other names are case-sensitive
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_rename_with_inferiors(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    a = await mail.create_mailbox(bob.id, "A/B/C")
    await deliver(storage, bob, "A/B/C")
    await mail.rename_mailbox(bob.id, "A", "X/Y")
    names = {m.name for m in await mail.list_mailboxes(bob.id)}
    assert {"X", "X/Y", "X/Y/B", "X/Y/B/C"} <= names
    assert not {"A", "A/B", "A/B/C"} & names
    moved = await mail.get_mailbox(bob.id, "X/Y/B/C")
    assert moved.id == a.id and moved.uidvalidity == a.uidvalidity
    assert len(await mail.uids(bob.id, moved.id)) == 1
    with pytest.raises(StorageError) as err:
        await mail.rename_mailbox(bob.id, "X/Y", "Sent")
    assert err.value.kind is ErrorKind.EXISTS
    with pytest.raises(StorageError) as err:
        await mail.rename_mailbox(bob.id, "Nope", "Other")
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_rename_inbox_moves_messages(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    inbox = await inbox_id(storage, bob)
    await deliver(storage, bob, subject="one", flags=(SEEN,))
    await deliver(storage, bob, subject="two")
    await mail.create_mailbox(bob.id, "INBOX/Kept")
    await mail.rename_mailbox(bob.id, "INBOX", "Old Mail")
    assert await mail.uids(bob.id, inbox) == []
    old = await mail.get_mailbox(bob.id, "Old Mail")
    entries = await mail.uids(bob.id, old.id)
    assert [e.uid for e in entries] == [1, 2]
    assert SEEN in entries[0].flags
    # INBOX's inferiors are not renamed with it.
    await mail.get_mailbox(bob.id, "INBOX/Kept")
    assert (await mail.status(bob.id, inbox)).messages == 0


async def test_delete_mailbox(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    await mail.create_mailbox(bob.id, "Tmp/Child")
    await deliver(storage, bob, "Tmp")
    await mail.delete_mailbox(bob.id, "Tmp")
    names = {m.name for m in await mail.list_mailboxes(bob.id)}
    assert "Tmp" not in names and "Tmp/Child" in names
    with pytest.raises(StorageError) as err:
        await mail.delete_mailbox(bob.id, "inbox")
    assert err.value.kind is ErrorKind.INVALID
    with pytest.raises(StorageError) as err:
        await mail.delete_mailbox(bob.id, "Tmp")
    assert err.value.kind is ErrorKind.NOT_FOUND
    assert await mail.quota_used(bob.id) == 0


async def test_subscribe(storage: SqlStorage, bob: Account) -> None:
    """RFC 3501 sections 6.3.6, 6.3.7: the subscription list holds names."""
    mail = storage.mail(bob)
    defaults = await mail.subscriptions(bob.id)
    assert "INBOX" in defaults and "Sent" in defaults  # what a new account starts with
    await mail.create_mailbox(bob.id, "Lists/Work")
    assert await mail.subscriptions(bob.id) == defaults  # CREATE does not subscribe
    await mail.set_subscribed(bob.id, "Lists/Work", True)
    await mail.set_subscribed(bob.id, "Lists/Work", True)
    await mail.set_subscribed(bob.id, "Not/Yet", True)  # no such mailbox: still allowed
    assert await mail.subscriptions(bob.id) == sorted([*defaults, "Lists/Work", "Not/Yet"])
    await mail.rename_mailbox(bob.id, "Lists", "Groups")  # the hierarchy moves as a whole
    assert "Groups/Work" in await mail.subscriptions(bob.id)
    await mail.delete_mailbox(bob.id, "Groups/Work")
    assert "Groups/Work" in await mail.subscriptions(bob.id)  # outlives its mailbox
    await mail.set_subscribed(bob.id, "Groups/Work", False)
    await mail.set_subscribed(bob.id, "Not/Yet", False)
    await mail.set_subscribed(bob.id, "Not/Yet", False)
    assert await mail.subscriptions(bob.id) == defaults


async def test_other_accounts_mailboxes_are_invisible(storage: SqlStorage, bob: Account) -> None:
    eve = await storage.directory.add_account("eve@example.org", "pw")
    bob_inbox = await inbox_id(storage, bob)
    with pytest.raises(StorageError) as err:
        await storage.mail(eve).get_mailbox_by_id(eve.id, bob_inbox)
    assert err.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(StorageError):
        await storage.mail(eve).fetch(eve.id, bob_inbox, UidSet.all())


# --- append and fetch ------------------------------------------------------------


async def test_append_and_fetch(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await mail.get_mailbox(bob.id, "INBOX")
    when = dt.datetime(2023, 7, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    made = await store_message(storage, bob, subject="Greetings", body="Body text")
    res = await mail.append(bob.id, box.id, made.message_id, [SEEN, "$Label1"], when)
    assert (res.uid, res.uidvalidity, res.mailbox_id) == (1, box.uidvalidity, box.id)
    assert res.modseq > box.highestmodseq
    uid2 = await deliver(storage, bob, subject="Second")
    assert uid2 == 2
    [msg] = await mail.fetch(bob.id, box.id, UidSet.of([1]))
    assert msg.entry.flags == frozenset({SEEN, "$Label1"})
    assert msg.entry.internal_date == when
    assert msg.entry.internal_date.utcoffset() == dt.timedelta(hours=2)
    assert msg.entry.size == len(made.raw) and msg.entry.blob_key == made.blob_key
    assert msg.parsed.subject == "Greetings"
    assert await storage.blobs.get(msg.entry.blob_key) == made.raw
    assert [m.entry.uid for m in await mail.fetch(bob.id, box.id, UidSet.all())] == [1, 2]
    # Missing UIDs are skipped; n:* covers the highest UID even past it (RFC 3501 section 9).
    assert [m.entry.uid for m in await mail.fetch(bob.id, box.id, UidSet.of([2, 7]))] == [2]
    assert [m.entry.uid for m in await mail.fetch(bob.id, box.id, UidSet(((9, None),)))] == [2]
    with pytest.raises(StorageError) as err:
        await mail.append(bob.id, box.id, made.message_id, ["\\Bogus"])
    assert err.value.kind is ErrorKind.INVALID
    with pytest.raises(StorageError) as err:
        await mail.append(bob.id, box.id, 999_999)
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_many_uid_ranges(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    made = await store_message(storage, bob)
    for _ in range(30):
        await mail.append(bob.id, box, made.message_id)
    wanted = UidSet.of(range(1, 31, 2))
    huge = UidSet.from_ranges(
        [(u, u) for u in range(1, 31, 2)] + [(1000 + 2 * i, 1000 + 2 * i) for i in range(400)]
    )
    assert [m.entry.uid for m in await mail.fetch(bob.id, box, wanted)] == list(range(1, 31, 2))
    assert [m.entry.uid for m in await mail.fetch(bob.id, box, huge)] == list(range(1, 31, 2))
    assert await mail.search(bob.id, box, Uids(huge)) == list(range(1, 31, 2))


async def test_two_instances_share_uid_allocation(
    storage: SqlStorage, bob: Account, database_url: str, tmp_path
) -> None:
    """Two Storage objects on one database (two daemons): appends from both
    interleave without duplicate or lost UIDs."""
    from storage.backend import open_storage_from_url

    other = await open_storage_from_url(database_url, tmp_path / "blobs")
    try:
        box = await inbox_id(storage, bob)
        made = await store_message(storage, bob)

        async def worker(s: SqlStorage) -> list[int]:
            return [
                (await s.mail(bob.id).append(bob.id, box, made.message_id)).uid for _ in range(15)
            ]

        a, b = await asyncio.gather(worker(storage), worker(other))
        assert sorted(a + b) == list(range(1, 31))
        assert a == sorted(a) and b == sorted(b)
    finally:
        await other.close()


async def test_concurrent_appends_get_unique_increasing_uids(
    storage: SqlStorage, bob: Account
) -> None:
    """100 appends from 10 tasks: unique, strictly increasing UIDs, none lost."""
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    made = await store_message(storage, bob)
    got: list[list[int]] = [[] for _ in range(10)]

    async def worker(i: int) -> None:
        for _ in range(10):
            res = await mail.append(bob.id, box, made.message_id)
            got[i].append(res.uid)

    await asyncio.gather(*(worker(i) for i in range(10)))
    every = sorted(u for lst in got for u in lst)
    assert every == list(range(1, 101))
    for lst in got:  # each task saw its own UIDs strictly increase
        assert lst == sorted(lst) and len(set(lst)) == len(lst)
    assert [e.uid for e in await mail.uids(bob.id, box)] == list(range(1, 101))
    status = await mail.status(bob.id, box)
    assert status.messages == 100 and status.uidnext == 101


# --- flags -------------------------------------------------------------------------


async def test_store_flags_modes(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    for _ in range(3):
        await deliver(storage, bob)
    res = await mail.store_flags(bob.id, box, UidSet.of([1, 2]), StoreMode.ADD, [SEEN, "Work"])
    assert [e.uid for e in res.updated] == [1, 2] and res.modified == ()
    assert all(e.flags == {SEEN, "Work"} for e in res.updated)
    first_modseq = res.updated[0].modseq
    # Adding flags already present changes nothing and bumps no modseq.
    res = await mail.store_flags(bob.id, box, UidSet.of([1]), StoreMode.ADD, ["\\seen", "work"])
    assert res.updated == ()
    res = await mail.store_flags(bob.id, box, UidSet.of([1]), StoreMode.REMOVE, ["WORK"])
    assert res.updated[0].flags == {SEEN} and res.updated[0].modseq > first_modseq
    res = await mail.store_flags(bob.id, box, UidSet.all(), StoreMode.REPLACE, [FLAGGED])
    assert [e.uid for e in res.updated] == [1, 2, 3]
    entries = await mail.uids(bob.id, box)
    assert [e.flags for e in entries] == [frozenset({FLAGGED})] * 3
    assert (await mail.status(bob.id, box)).highestmodseq == res.updated[0].modseq
    await mail.store_flags(bob.id, box, UidSet.of([2]), StoreMode.ADD, ["$Junk", "Work"])
    assert await mail.mailbox_keywords(bob.id, box) == ["$Junk", "Work"]


async def test_snapshot_agrees_with_the_entries(storage: SqlStorage, bob: Account) -> None:
    """MailStore.snapshot (what IMAP SELECT reads) gives the UIDs, the first
    unseen UID and the keywords that the entries themselves give, through
    random deliveries, flag changes and expunges; entries() reads ranges."""
    rng = random.Random()
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    empty = await mail.snapshot(bob.id, box)
    assert (list(empty.uids), empty.first_unseen, empty.keywords) == ([], None, ())
    for _ in range(rng.randint(20, 60)):
        await deliver(storage, bob, flags=tuple(rng.sample([SEEN, FLAGGED, "Work"], 2)))
    for _ in range(3):
        picked = UidSet.of(rng.sample(range(1, 20), rng.randint(1, 8)))
        mode = rng.choice([StoreMode.ADD, StoreMode.REMOVE, StoreMode.REPLACE])
        await mail.store_flags(bob.id, box, picked, mode, rng.sample([SEEN, DELETED, "$Junk"], 2))
        await mail.expunge(bob.id, box)
        entries = await mail.uids(bob.id, box)
        snap = await mail.snapshot(bob.id, box)
        assert list(snap.uids) == [e.uid for e in entries]
        unseen = [e.uid for e in entries if SEEN not in e.flags]
        assert snap.first_unseen == (unseen[0] if unseen else None)
        assert list(snap.keywords) == await mail.mailbox_keywords(bob.id, box)
        some = UidSet.of([*rng.sample([e.uid for e in entries], min(5, len(entries))), 10 ** 6])
        assert await mail.entries(bob.id, box, some) == [e for e in entries if e.uid in some]
    with pytest.raises(StorageError) as err:
        await mail.snapshot(bob.id, 999_999)
    assert err.value.kind is ErrorKind.NOT_FOUND


async def test_store_of_system_flags_keeps_keywords_and_logs_the_result(
    storage: SqlStorage, bob: Account
) -> None:
    """+FLAGS/-FLAGS of system flags alone (the usual \\Seen) leave an
    entry's keywords as they are; the change log and the event carry the
    flags after the change, and an entry that already had them is untouched."""
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    for _ in range(2):
        await deliver(storage, bob)
    await mail.store_flags(bob.id, box, UidSet.of([1]), StoreMode.ADD, ["Work", "$Junk"])
    await mail.store_flags(bob.id, box, UidSet.of([2]), StoreMode.ADD, [SEEN])
    start = (await mail.account_changes(bob.id, 0, limit=10_000))[-1].id
    sub = storage.events.subscribe(bob.id)
    try:
        res = await mail.store_flags(bob.id, box, UidSet.of([1, 2]), StoreMode.ADD, [SEEN, DELETED])
        assert [e.uid for e in res.updated] == [1, 2]
        assert res.updated[0].flags == {SEEN, DELETED, "Work", "$Junk"}
        assert res.updated[1].flags == {SEEN, DELETED}
        again = await mail.store_flags(bob.id, box, UidSet.of([1, 2]), StoreMode.ADD, [SEEN])
        assert again.updated == ()
        res2 = await mail.store_flags(bob.id, box, UidSet.of([1]), StoreMode.REMOVE, [DELETED])
        assert res2.updated[0].flags == {SEEN, "Work", "$Junk"}
        assert res2.updated[0].modseq > res.updated[0].modseq
        entries = await mail.uids(bob.id, box)
        assert [e.flags for e in entries] == [
            frozenset({SEEN, "Work", "$Junk"}),
            frozenset({SEEN, DELETED}),
        ]
        assert [e.modseq for e in entries] == [res2.updated[0].modseq, res.updated[1].modseq]
        assert (await mail.status(bob.id, box)).highestmodseq == res2.updated[0].modseq
        log = await mail.account_changes(bob.id, start)
        assert [(c.kind, c.uid, c.data["flags"]) for c in log] == [
            (ChangeKind.FLAGS, 1, sorted({SEEN, DELETED, "Work", "$Junk"})),
            (ChangeKind.FLAGS, 2, sorted({SEEN, DELETED})),
            (ChangeKind.FLAGS, 1, sorted({SEEN, "Work", "$Junk"})),
        ]
        assert [c.id for c in log] == list(range(start + 1, start + 4))
        assert [c.modseq for c in log] == [e.modseq for e in (*res.updated, *res2.updated)]
        published = [await sub.get(timeout=2) for _ in range(3)]
        assert published == log
        assert [c.data for c in published if c] == [c.data for c in log]
    finally:
        sub.close()


async def test_store_unchanged_since(storage: SqlStorage, bob: Account) -> None:
    """RFC 7162 section 3.1.3: entries modified after UNCHANGEDSINCE are refused."""
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    await deliver(storage, bob)
    await deliver(storage, bob)
    before = (await mail.status(bob.id, box)).highestmodseq
    await mail.store_flags(bob.id, box, UidSet.of([2]), StoreMode.ADD, [ANSWERED])
    res = await mail.store_flags(
        bob.id, box, UidSet.of([1, 2]), StoreMode.ADD, [SEEN], unchanged_since=before
    )
    assert [e.uid for e in res.updated] == [1]
    assert res.modified == (2,)
    [e1, e2] = await mail.uids(bob.id, box)
    assert SEEN in e1.flags and SEEN not in e2.flags


# --- search ------------------------------------------------------------------------


@pytest.fixture
async def searchable(storage: SqlStorage, bob: Account) -> int:
    d = dt.datetime
    await deliver(
        storage,
        bob,
        subject="Quarterly report",
        body="Revenue grew strongly",
        sender="alice@example.net",
        date=d(2024, 1, 10, 23, 30, tzinfo=UTC),
        internal_date=d(2024, 1, 11, 8, 0, tzinfo=UTC),
        flags=(SEEN,),
    )
    await deliver(
        storage,
        bob,
        subject="Lunch?",
        body="Pizza at noon",
        sender="carol@example.com",
        cc="dave@example.com",
        date=d(2024, 2, 1, 12, 0, tzinfo=UTC),
        internal_date=d(2024, 2, 1, 12, 5, tzinfo=UTC),
        extra_headers=(
            ("X-Priority", "1 (Highest)"),
            ("List-Id", "<team.example.com>"),
            ("X-Custom", "=?utf-8?q?Gr=C3=B6=C3=9Fe?=\r\n folded"),
        ),
    )
    await deliver(
        storage,
        bob,
        subject="Größenänderung",
        body="Ünïcödé body " + "x" * 2000,
        sender="emil@example.de",
        date=d(2024, 3, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=5))),
        internal_date=d(2024, 3, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=5))),
        flags=(FLAGGED, "Project_X"),
    )
    return await inbox_id(storage, bob)


SEARCHES = [
    (All(), [1, 2, 3]),
    (Flag(SEEN), [1]),
    (Flag(SEEN, False), [2, 3]),
    (Flag("\\flagged"), [3]),
    (Flag("project_x"), [3]),
    (Flag("Project"), []),
    (Flag("Project%"), []),
    (Header("subject", "REPORT"), [1]),
    (Header("from", "carol@"), [2]),
    (Header("cc", "dave"), [2]),
    (Header("to", "bob@example.org"), [1, 2, 3]),
    (Header("subject", "größen"), [3]),
    (Header("x-priority", "highest"), [2]),
    (Header("List-ID", ""), [2]),
    (Header("x-missing", ""), []),
    (Header("x-custom", "größe folded"), [2]),  # RFC 2047 decoded, unfolded
    (Text("body", "revenue"), [1]),
    (Text("body", "ÜNÏ"), [3]),
    (Text("body", "report"), []),
    # The index has no columns: its subject hit is weeded out by the exact match.
    (Text("body", "quarterly"), []),
    (Text("text", "report"), [1]),
    (Text("text", "team.example"), [2]),
    (Text("text", "pizza"), [2]),
    (Text("body", "100%"), []),
    (Text("body", "VENU"), [1]),  # a substring inside a word
    (Text("body", "iz"), [2]),  # shorter than a trigram
    (Text("body", 'a "quoted'), []),
    # The API's free text: subject, addresses and body, not trace or list fields.
    (Text("content", "PIZZA"), [2]),
    (Text("content", "carol@"), [2]),
    (Text("content", "dave"), [2]),
    (Text("content", "größen"), [3]),
    (Text("content", "venu"), [1]),
    (Text("content", "team.example"), []),  # only in List-Id: TEXT finds it, content not
    (Text("content", "highest"), []),  # only in X-Priority
    (Header("subject", "t?"), []),
    (Header("subject", "h?"), [2]),
    (Date("internal", "on", dt.date(2024, 2, 1)), [2]),
    (Date("internal", "before", dt.date(2024, 2, 1)), [1]),
    (Date("internal", "since", dt.date(2024, 2, 1)), [2, 3]),
    # SENTON compares the Date header's own calendar day, not the UTC one.
    (Date("sent", "on", dt.date(2024, 1, 10)), [1]),
    (Date("sent", "on", dt.date(2024, 3, 1)), [3]),
    (Size("larger", 1000), [3]),
    (Size("smaller", 1000), [1, 2]),
    (Uids(UidSet.of([1, 3])), [1, 3]),
    (Uids(UidSet(((3, None),))), [3]),
    (Not(Flag(SEEN)), [2, 3]),
    (Or(Header("from", "alice"), Header("from", "emil")), [1, 3]),
    (And((Flag(SEEN, False), Not(Header("subject", "lunch")))), [3]),
    (Or(Header("x-priority", "1"), Flag(SEEN)), [1, 2]),
    (Not(Or(Header("x-priority", "1"), Flag(SEEN))), [3]),
    (And((Text("text", "example"), Size("smaller", 1000))), [1, 2]),
]


async def test_search(storage: SqlStorage, bob: Account, searchable: int) -> None:
    """The whole table on one mailbox (one setup per backend keeps this fast)."""
    mail = storage.mail(bob)
    failures = []
    for criteria, expected in SEARCHES:
        got = await mail.search(bob.id, searchable, criteria)
        if got != expected:
            failures.append(f"{criteria!r}: got {got}, expected {expected}")
    assert not failures, "\n".join(failures)


async def test_search_modseq_and_account(
    storage: SqlStorage, bob: Account, searchable: int
) -> None:
    mail = storage.mail(bob)
    res = await mail.store_flags(bob.id, searchable, UidSet.of([2]), StoreMode.ADD, [ANSWERED])
    assert await mail.search(bob.id, searchable, ModSeq(res.updated[0].modseq)) == [2]
    sent = await inbox_id(storage, bob, "Sent")
    await deliver(storage, bob, "Sent", subject="Re: Quarterly report")
    found = await mail.search_account(bob.id, Header("subject", "quarterly"))
    assert {(e.mailbox_id, e.uid) for e in found} == {(searchable, 1), (sent, 1)}
    # Newest internal date first.
    assert found[0].mailbox_id == sent
    limited = await mail.search_account(bob.id, Header("x-priority", "1"), limit=1)
    assert [(e.mailbox_id, e.uid) for e in limited] == [(searchable, 2)]


_SUBJECT_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + "éüøñαβγÉÜØÑΑΒΓ"


def _encoded_subject(text: str, rng: random.Random) -> str:
    """``text`` as a Subject field value: plain when ASCII, else an RFC 2047
    encoded word, B or Q encoding at random."""
    if text.isascii() and rng.random() < 0.5:
        return text
    if rng.random() < 0.5:
        return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="
    q = "".join(
        c if c.isascii() and c.isalnum() else "_" if c == " " else
        "".join(f"={b:02X}" for b in c.encode()) for c in text
    )
    return "=?UTF-8?Q?" + q + "?="


async def test_search_subject_is_a_case_insensitive_substring(
    storage: SqlStorage, bob: Account
) -> None:
    """RFC 3501 section 6.4.4: SUBJECT matches a case-insensitive substring
    of the decoded subject (encoded words decoded, inside a word too, any
    script), whatever index narrows it; the words of bodies and other
    fields do not match."""
    from storage.ingest import Delivery, ingest

    rng = random.Random()
    words = ["".join(rng.choices(_SUBJECT_LETTERS, k=rng.randint(3, 9))) for _ in range(12)]
    subjects = []
    for i in range(rng.randint(15, 30)):
        subject = " ".join(rng.choices(words, k=rng.randint(1, 4)))
        decoy = rng.choice(words)  # in the body and sender only
        raw = (
            f"From: {decoy} <a@example.org>\r\nTo: bob@example.org\r\n"
            f"Subject: {_encoded_subject(subject, rng)}\r\nMessage-ID: <{i}.{rng.random()}@x>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            f"{decoy} {decoy.upper()} body\r\n"
        ).encode()
        await ingest(storage, [Delivery(bob)], raw)
        subjects.append(subject)
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    needles = [rng.choice(words)[1:] for _ in range(6)]  # inside a word
    for _ in range(6):
        subject = rng.choice(subjects)
        start = rng.randrange(len(subject))
        needles.append(subject[start : start + rng.randint(1, 12)])  # across words too
    needles += [w.swapcase() for w in rng.sample(words, 4)]  # other case
    needles += ["".join(rng.choices(_SUBJECT_LETTERS, k=7)), "body"]  # absent from subjects
    for needle in needles:
        expected = [u + 1 for u, s in enumerate(subjects) if needle.casefold() in s.casefold()]
        got = await mail.search(bob.id, box, Header("subject", needle))
        assert got == expected, (needle, subjects)


# --- copy, move, expunge ---------------------------------------------------------------


async def test_copy(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    src = await inbox_id(storage, bob)
    dest = await mail.get_mailbox(bob.id, "Archive")
    when = dt.datetime(2022, 5, 6, 7, 8, 9, tzinfo=UTC)
    await deliver(storage, bob, flags=(SEEN, "Tag"), internal_date=when)
    await deliver(storage, bob)
    await deliver(storage, bob)
    res = await mail.copy(bob.id, src, UidSet.of([1, 3]), dest.id)
    assert res.uidvalidity == dest.uidvalidity
    assert res.pairs == ((1, 1), (3, 2))
    copies = await mail.uids(bob.id, dest.id)
    originals = await mail.uids(bob.id, src)
    assert copies[0].flags == {SEEN, "Tag"} and copies[0].internal_date == when
    assert copies[0].blob_key == originals[0].blob_key
    assert copies[0].message_id == originals[0].message_id
    assert len(originals) == 3
    assert (await mail.copy(bob.id, src, UidSet.of([99]), dest.id)).pairs == ()


async def test_move(storage: SqlStorage, bob: Account) -> None:
    """RFC 6851: copy then expunge in one transaction."""
    mail = storage.mail(bob)
    src = await inbox_id(storage, bob)
    dest = await inbox_id(storage, bob, "Trash")
    for _ in range(3):
        await deliver(storage, bob)
    before = (await mail.status(bob.id, src)).highestmodseq
    res = await mail.move(bob.id, src, UidSet.of([2, 3]), dest)
    assert res.pairs == ((2, 1), (3, 2))
    assert [e.uid for e in await mail.uids(bob.id, src)] == [1]
    assert [e.uid for e in await mail.uids(bob.id, dest)] == [1, 2]
    changes = await mail.changes_since(bob.id, src, before)
    assert changes.vanished == (2, 3)
    sizes = [e.size for box in (src, dest) for e in await mail.uids(bob.id, box)]
    assert await mail.quota_used(bob.id) == sum(sizes)


async def test_move_into_the_source_mailbox(storage: SqlStorage, bob: Account) -> None:
    """RFC 6851 section 3.3: the messages take new UIDs; the old ones vanish
    at a modseq above the new entries', so a CHANGEDSINCE reader sees both."""
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    for _ in range(3):
        await deliver(storage, bob)
    await mail.store_flags(bob.id, box, UidSet.of([1]), StoreMode.ADD, [FLAGGED])
    used = await mail.quota_used(bob.id)
    before = (await mail.status(bob.id, box)).highestmodseq
    res = await mail.move(bob.id, box, UidSet.of([1, 3]), box)
    assert res.pairs == ((1, 4), (3, 5))
    entries = {e.uid: e for e in await mail.uids(bob.id, box)}
    assert sorted(entries) == [2, 4, 5]
    assert FLAGGED in entries[4].flags and FLAGGED not in entries[5].flags
    changes = await mail.changes_since(bob.id, box, before)
    assert changes.vanished == (1, 3)
    assert sorted(e.uid for e in changes.changed) == [4, 5]
    top = (await mail.status(bob.id, box)).highestmodseq
    assert top > max(entries[4].modseq, entries[5].modseq) > before
    assert await mail.quota_used(bob.id) == used


async def test_expunge_and_changes_since(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    for _ in range(5):
        await deliver(storage, bob)
    base = (await mail.status(bob.id, box)).highestmodseq
    await mail.store_flags(bob.id, box, UidSet.of([1, 2, 4]), StoreMode.ADD, [DELETED])
    # UID EXPUNGE (RFC 4315): only \Deleted entries within the set.
    assert await mail.expunge(bob.id, box, UidSet.of([2, 3, 4])) == [2, 4]
    mid = (await mail.status(bob.id, box)).highestmodseq
    assert await mail.expunge(bob.id, box) == [1]
    assert await mail.expunge(bob.id, box) == []
    assert [e.uid for e in await mail.uids(bob.id, box)] == [3, 5]
    changes = await mail.changes_since(bob.id, box, base)
    assert changes.vanished == (1, 2, 4)
    assert changes.changed == ()
    assert changes.highestmodseq == (await mail.status(bob.id, box)).highestmodseq
    assert (await mail.changes_since(bob.id, box, mid)).vanished == (1,)
    await mail.store_flags(bob.id, box, UidSet.of([5]), StoreMode.ADD, [SEEN])
    later = await mail.changes_since(bob.id, box, changes.highestmodseq)
    assert [e.uid for e in later.changed] == [5] and later.vanished == ()
    assert await mail.quota_used(bob.id) == sum(e.size for e in await mail.uids(bob.id, box))


async def test_expunge_of_uids_whatever_their_flags(storage: SqlStorage, bob: Account) -> None:
    """``flagged_only=False``: a MOVE's originals leave in one write, each
    logged as an expunge only (RFC 6851 section 3.3)."""
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    count = random.randint(4, 9)
    for _ in range(count):
        await deliver(storage, bob)
    await mail.store_flags(bob.id, box, UidSet.of([1]), StoreMode.ADD, [DELETED])
    chosen = sorted(random.sample(range(2, count + 1), random.randint(1, count - 2)))
    logged = await mail.account_changes(bob.id, 0, limit=10**6)
    assert await mail.expunge(bob.id, box, UidSet.of(chosen), flagged_only=False) == chosen
    changes = await mail.account_changes(bob.id, logged[-1].id)
    assert [(c.kind, c.uid) for c in changes] == [(ChangeKind.EXPUNGE, u) for u in chosen]
    left = [u for u in range(1, count + 1) if u not in chosen]
    assert [e.uid for e in await mail.uids(bob.id, box)] == left  # UID 1, flagged, stays
    with pytest.raises(ValueError):
        await mail.expunge(bob.id, box, flagged_only=False)  # never a whole mailbox
    assert await mail.quota_used(bob.id) == sum(e.size for e in await mail.uids(bob.id, box))


async def test_status(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await mail.get_mailbox(bob.id, "INBOX")
    empty = await mail.status(bob.id, box.id)
    assert (empty.messages, empty.unseen, empty.uidnext, empty.size) == (0, 0, 1, 0)
    assert empty.uidvalidity == box.uidvalidity
    await deliver(storage, bob, flags=(SEEN,), body="a" * 100)
    await deliver(storage, bob, body="b")
    await deliver(storage, bob, flags=(FLAGGED,))
    st = await mail.status(bob.id, box.id)
    entries = await mail.uids(bob.id, box.id)
    assert (st.messages, st.unseen, st.uidnext) == (3, 2, 4)
    assert st.size == sum(e.size for e in entries)
    assert st.highestmodseq == max(e.modseq for e in entries)


# --- quota, recent, leases ---------------------------------------------------------------


async def test_quota(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    made = await store_message(storage, bob, body="x" * 300)
    size = len(made.raw)
    await storage.directory.set_quota(bob.address, size * 2)
    await mail.append(bob.id, box, made.message_id)
    await mail.append(bob.id, box, made.message_id)
    assert await mail.quota_used(bob.id) == size * 2
    with pytest.raises(StorageError) as err:
        await mail.append(bob.id, box, made.message_id)
    assert err.value.kind is ErrorKind.OVER_QUOTA
    with pytest.raises(StorageError) as err:
        await mail.copy(bob.id, box, UidSet.all(), await inbox_id(storage, bob, "Archive"))
    assert err.value.kind is ErrorKind.OVER_QUOTA
    # A move does not grow usage.
    await mail.move(bob.id, box, UidSet.of([1]), await inbox_id(storage, bob, "Archive"))
    assert (await mail.status(bob.id, box)).messages == 1
    await storage.directory.set_quota(bob.address, None)
    await mail.append(bob.id, box, made.message_id)
    assert await mail.quota_used(bob.id) == size * 3


async def test_claim_recent(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    await deliver(storage, bob)
    await deliver(storage, bob)
    assert await mail.claim_recent(bob.id, box) == 1  # UIDs >= 1 are recent for me
    assert await mail.claim_recent(bob.id, box) == 3  # nothing recent for the next session
    await deliver(storage, bob)
    floors = await asyncio.gather(*(mail.claim_recent(bob.id, box) for _ in range(5)))
    assert sorted(floors) == [3, 4, 4, 4, 4]  # exactly one session gets UID 3


async def test_locks(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    assert await mail.acquire_lock("pop3:1", "a", 30)
    assert await mail.acquire_lock("pop3:1", "a", 30)  # renewal
    assert not await mail.acquire_lock("pop3:1", "b", 30)
    await mail.release_lock("pop3:1", "b")  # not the holder: no effect
    assert not await mail.acquire_lock("pop3:1", "b", 30)
    await mail.release_lock("pop3:1", "a")
    assert await mail.acquire_lock("pop3:1", "b", 0.05)
    await asyncio.sleep(0.1)
    assert await mail.acquire_lock("pop3:1", "c", 30)  # expired lease taken over
    results = await asyncio.gather(*(mail.acquire_lock("race", f"o{i}", 30) for i in range(8)))
    assert results.count(True) == 1


# --- change log and events ---------------------------------------------------------------


async def test_change_log_and_events(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    box = await inbox_id(storage, bob)
    start = (await mail.account_changes(bob.id, 0, limit=10_000))[-1].id
    sub = storage.events.subscribe(bob.id)
    other = storage.events.subscribe(bob.id + 1000)
    try:
        uid = await deliver(storage, bob)
        await mail.store_flags(bob.id, box, UidSet.of([uid]), StoreMode.ADD, [DELETED])
        await mail.expunge(bob.id, box)
        await mail.create_mailbox(bob.id, "New")
        log = await mail.account_changes(bob.id, start)
        assert [c.kind for c in log] == [
            ChangeKind.NEW,
            ChangeKind.FLAGS,
            ChangeKind.EXPUNGE,
            ChangeKind.MAILBOX,
        ]
        assert [c.id for c in log] == list(range(start + 1, start + 5))
        assert all(c.account_id == bob.id for c in log)
        assert log[0].uid == uid and log[0].mailbox_id == box
        assert log[1].data["flags"] == [DELETED]
        assert log[3].data["name"] == "New"
        published = [await sub.get(timeout=2) for _ in range(4)]
        assert [c.id for c in published if c] == [c.id for c in log]
        assert await other.get(timeout=0.05) is None
        assert await mail.account_changes(bob.id, start, limit=2) == log[:2]
    finally:
        sub.close()
        other.close()


async def test_failed_write_logs_and_publishes_nothing(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    before = await mail.account_changes(bob.id, 0, limit=10_000)
    sub = storage.events.subscribe(bob.id)
    try:
        # A NOTIFY of the previous test (same account id in the reset
        # PostgreSQL database) may still be on its way: let it arrive first.
        while await sub.get(timeout=0.1) is not None:
            pass
        with pytest.raises(StorageError):
            await mail.create_mailbox(bob.id, "Sent")
        assert await sub.get(timeout=0.05) is None
        assert await mail.account_changes(bob.id, 0, limit=10_000) == before
    finally:
        sub.close()


async def test_threads(storage: SqlStorage, bob: Account) -> None:
    mail = storage.mail(bob)
    first = await store_message(storage, bob, message_id="<root@x>")
    reply = await store_message(storage, bob, message_id="<r1@x>", in_reply_to="<root@x>")
    alone = await store_message(storage, bob)
    t1 = await mail.thread_of(bob.id, first.message_id)
    assert t1 is not None
    assert await mail.thread_of(bob.id, reply.message_id) == t1
    assert await mail.thread_of(bob.id, alone.message_id) != t1


async def test_a_snapshot_shares_its_flag_sets(storage: SqlStorage, bob: Account) -> None:
    """SELECT of a big mailbox holds one flag set per distinct combination of
    flags, not one per message (100,000 entries, a handful of sets)."""
    import random

    rng = random.Random()
    combos = [(), (SEEN,), (SEEN, FLAGGED), ("$Label1",), (SEEN, "$Label1")]
    for _ in range(rng.randint(20, 40)):
        await deliver(storage, bob, flags=rng.choice(combos))
    entries = await storage.mail(bob).uids(bob.id, await inbox_id(storage, bob))
    assert {e.flags for e in entries} <= {frozenset(c) for c in combos}
    assert len({id(e.flags) for e in entries}) == len({e.flags for e in entries})
