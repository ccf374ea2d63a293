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
from sqlalchemy import make_url

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
