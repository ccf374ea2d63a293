"""Round trips of a delivery on PostgreSQL, counted by the server itself
(``log_statement = all``). Each one is a wakeup of the server process and
of ours, and on a busy host a wait for a core: that, not the SQL, bounds
how many messages a second a site on PostgreSQL stores."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path
from typing import Any

import asyncpg

from storage.backend import open_storage_from_url
from tests.contract.conftest import TEST_HASHER
from tests.contract.mailfactory import build

# Per delivery: lock the account with its mailbox, insert the message, then
# its entry, the mailbox's counters, the change log and the account's
# counters in one statement. BEGIN and COMMIT are shared by the batch.
ROUND_TRIPS_PER_DELIVERY = 3


async def test_a_delivery_costs_three_statements_and_shares_begin_and_commit(
    pg_server: Any, tmp_path: Path
) -> None:
    server = pg_server.server
    url = await server.create_database()
    name = url.rsplit("/", 1)[1]
    storage = await open_storage_from_url(url, tmp_path / "blobs", password_hasher=TEST_HASHER)
    try:
        await storage.directory.add_domain("example.org")
        bob = await storage.directory.add_account("bob@example.org", "pw")
        mail = storage.mail(bob)
        admin = await asyncpg.connect(
            host="127.0.0.1", port=server.port, user=server.user, database=name
        )
        await admin.execute(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'")
        await admin.close()
        await storage.databases["default"].engine.dispose()  # new sessions log
        count = random.randint(10, 30)
        made = []
        for _ in range(count):
            raw, parsed = build(body="x" * random.randint(1, 3000))
            made.append((await storage.blobs.put(raw), parsed))
        log = server.root / "postgres.log"
        start = log.stat().st_size
        results = await asyncio.gather(
            *(mail.deliver(bob.id, key, parsed, [("INBOX", (), None)]) for key, parsed in made)
        )
        assert sorted(r[0].uid for r in results) == list(range(1, count + 1))
        text = log.read_bytes()[start:].decode(errors="replace")
    finally:
        await storage.close()
    statements = [s.strip() for s in re.findall(r"(?:statement|execute [^:]*): (.*)", text)]
    # Not per delivery: BEGIN and COMMIT (per batch), NOTIFY (per commit), and
    # per connection the pool's ping (an empty statement) and asyncpg's
    # first look at a type (the array types of the one-statement flush).
    per_batch = ("BEGIN", "COMMIT", "SELECT pg_notify", "WITH RECURSIVE typeinfo_tree")
    writes = [s for s in statements if s and not s.startswith(per_batch)]
    assert len(writes) <= ROUND_TRIPS_PER_DELIVERY * count, writes
    commits = [s for s in statements if s.startswith("COMMIT")]
    assert 1 <= len(commits) < count  # shared
