"""Six sessions churning one INBOX against the real IMAP server: each must
hear of the others' expunges and new messages where RFC 3501 section 7.4.1
allows, and its view must be storage's once it has sent NOOP (issue #24)."""

from __future__ import annotations

import random
import time

from bench.imap_churn import churn_message, open_churn, run_churn, verify
from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv

SESSIONS = 6
SECONDS = 15.0
FLOOR = 35  # sessions append only while their view holds fewer messages


async def test_churning_sessions_see_what_storage_holds(imap_env: ImapEnv) -> None:
    rng = random.Random()
    for n in range(FLOOR + rng.randint(5, 25)):
        await imap_env.deliver(churn_message(99, n, rng)[1])
    sessions = await open_churn(imap_env.port, USER, SESSIONS, FLOOR, password=PASSWORD)
    started = time.monotonic()
    try:
        await run_churn(sessions, SECONDS)
        problems = await verify(sessions, imap_env.port, PASSWORD)
    finally:
        for s in sessions:
            await s.close()
    assert not problems.counts, problems.report()
    # The views shrank as the others expunged, so appending kept going to the end.
    assert all(s.smallest_view < FLOOR for s in sessions)
    late = started + SECONDS * 2 / 3
    assert sum(1 for s in sessions for t in s.append_times if t > late) >= SESSIONS
