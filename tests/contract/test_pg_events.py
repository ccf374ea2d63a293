"""PostgreSQL's event bus under group commit: a session on this instance
hears a change as soon as it is published (not after a round trip to the
server and back), each once; sessions on another instance get every change
of a commit, in order, from one NOTIFY rather than one per change."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from typing import Any

import asyncpg
import pytest
from sqlalchemy import make_url

from storage import events
from storage.events import NOTIFY_CHANNEL, PgNotifyEventBus
from storage.model import Change, ChangeKind


def change(account_id: int, n: int) -> Change:
    return Change(
        id=n,
        account_id=account_id,
        kind=ChangeKind.NEW,
        mailbox_id=1,
        uid=n,
        modseq=n + 1,
        at=dt.datetime.now(dt.UTC),
        data={"flags": random.sample(["\\Seen", "\\Flagged", "$Junk", "ü"], random.randint(0, 3))},
    )


async def test_a_commits_changes_reach_every_instance_once_from_one_notify(pg_server: Any) -> None:
    url = await pg_server.server.create_database()
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    mine, theirs = PgNotifyEventBus(dsn), PgNotifyEventBus(dsn)
    await mine.start()
    await theirs.start()
    notifies: list[str] = []
    spy = await asyncpg.connect(dsn)
    await spy.add_listener(NOTIFY_CHANNEL, lambda *args: notifies.append(args[3]))
    here, there = mine.subscribe(7), theirs.subscribe(7)
    try:
        published = [change(7, n) for n in range(1, random.randint(3, 30))]
        for c in published:  # as a group commit's after-commit actions run
            await mine.publish(c)
        # This instance's subscriber has every change already.
        assert [await here.get(timeout=0) for _ in published] == published
        # The other instance's, in order, all of them.
        assert [await there.get(timeout=5) for _ in published] == published
        await asyncio.sleep(0.2)
        assert len(notifies) == 1  # one NOTIFY for the lot
        assert await here.get(timeout=0.2) is None  # its own NOTIFY is not heard twice
    finally:
        here.close()
        there.close()
        await spy.close()
        await mine.close()
        await theirs.close()


async def test_a_lone_instance_sends_no_notify_until_another_listens(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NOTIFY per commit costs both server processes and ours a wakeup:
    with no other instance listening (a lone mtad, a lone imapd) none is
    sent. Another instance's listener says hello when it connects, and
    hears every change from then on, without waiting for the next look at
    pg_stat_activity; once it is gone, none is sent again."""
    monkeypatch.setattr(events, "PEER_CHECK_SECONDS", 3600.0)  # only the hello can tell
    url = await pg_server.server.create_database()
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    mine, theirs = PgNotifyEventBus(dsn), PgNotifyEventBus(dsn)
    await mine.start()
    notifies: list[str] = []
    spy = await asyncpg.connect(dsn)  # listens, but is no instance
    await spy.add_listener(NOTIFY_CHANNEL, lambda *args: notifies.append(args[3]))
    here = mine.subscribe(7)
    try:
        alone = [change(7, n) for n in range(1, random.randint(3, 30))]
        for c in alone:
            await mine.publish(c)
        assert [await here.get(timeout=0) for _ in alone] == alone
        await asyncio.sleep(0.5)
        assert notifies == []
        await theirs.start()
        there = theirs.subscribe(7)
        for n in range(len(alone) + 1, len(alone) + 20):  # until our listener heard its hello
            await mine.publish(change(7, n))
            assert await here.get(timeout=0) is not None
            if await there.get(timeout=0.25) is not None:
                break
        else:
            raise AssertionError("the other instance's hello was not heard")
        with_peer = [change(7, i) for i in range(n + 1, n + random.randint(2, 10))]
        for c in with_peer:
            await mine.publish(c)
        assert [await there.get(timeout=5) for _ in with_peer] == with_peer
        assert [await here.get(timeout=0) for _ in with_peer] == with_peer
        # The NOTIFY's own commit waits for no WAL flush.
        async with mine._lock:  # the sender may be using it
            assert await mine._publisher.fetchval("SHOW synchronous_commit") == "off"
        there.close()
        monkeypatch.setattr(events, "PEER_CHECK_SECONDS", 0.1)
        third = PgNotifyEventBus(dsn)
        await third.start()  # its hello now holds for 0.1 s only
        await third.close()
        await theirs.close()
        await asyncio.sleep(0.5)
        sent = len(notifies)
        last = change(7, 100)
        await mine.publish(last)
        assert await here.get(timeout=0) == last
        await asyncio.sleep(0.5)
        assert len(notifies) == sent
    finally:
        here.close()
        await spy.close()
        await mine.close()
        await theirs.close()
