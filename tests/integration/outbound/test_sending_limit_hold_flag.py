"""The sending-limit hold of an account (issue #22, delivery/limits.py) on
the embedded default: no ``[redis] url``, daemons and ``mailctl`` in
separate processes over one site.

Over real SMTP submission (smtplib, STARTTLS + AUTH) an account goes over
its recipients-per-hour limit: refused, and flagged, so its next message
(within the limit) is queued held. ``mailctl queue release --account``, run
as a subprocess as an admin would, releases it and clears the flag for the
running daemon: its next message is queued not held, without a restart.
Flagged again and not released, the hold outlives a restart of the daemon.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from pathlib import Path
from typing import Any

from conf.settings import LimitsSettings
from tests.conftest import make_settings
from tests.integration.outbound.conftest import ALICE, ALICE_PW
from tests.integration.outbound.test_sending_limits import (
    BOB,
    BOB_PW,
    instance,
    refusal,
    send,
    subjects_of,
)
from tests.integration.test_mailctl import mailctl, ok

RCPT_LIMIT = random.randint(4, 7)  # user_recipients_per_hour


def site_settings(data_dir: Path, tmp_path: Path) -> Any:
    off = dict.fromkeys(LimitsSettings.model_fields, 0)
    settings = make_settings(
        data_dir,
        limits={**off, "user_recipients_per_hour": RCPT_LIMIT},
        queue={"dkim_key_dir": str(tmp_path / "dkim")},
    )
    assert not settings.redis.url  # the embedded default: no shared state but the database
    return settings


def rcpts(tag: str, count: int) -> list[str]:
    return [f"{tag}{k}@postfix.test" for k in range(count)]


async def held_subjects(node: Any) -> tuple[set[str], set[str]]:
    """(subjects queued held, subjects queued not held) of the site."""
    entries = await node.storage.queue.list()
    held = await subjects_of(node.storage, [e for e in entries if e.held])
    free = await subjects_of(node.storage, [e for e in entries if not e.held])
    return held, free


async def test_release_reaches_the_running_daemon_and_a_restart_keeps_the_hold(
    tmp_path: Path, tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    data = tmp_path / "site"
    tag = f"t{random.getrandbits(32):x}"
    settings = site_settings(data, tmp_path)
    async with instance(settings, tls_context, accounts=True) as node:
        ctx = client_tls_context
        assert await send(node, ctx, False, ALICE, ALICE_PW, rcpts("a", 1), f"{tag}-1") is None
        # Past the limit in one message: refused, her queued mail held, the account flagged.
        got = await send(node, ctx, False, ALICE, ALICE_PW, rcpts("b", RCPT_LIMIT), f"{tag}-x")
        assert got == refusal(RCPT_LIMIT, "recipients")
        assert await held_subjects(node) == ({f"{tag}-1"}, set())
        # Within the limit again (the refusal took its count back): queued held.
        assert await send(node, ctx, False, ALICE, ALICE_PW, rcpts("c", 1), f"{tag}-2") is None
        assert await send(node, ctx, False, BOB, BOB_PW, rcpts("d", 1), f"{tag}-bob") is None
        assert await held_subjects(node) == ({f"{tag}-1", f"{tag}-2"}, {f"{tag}-bob"})

        # The admin, in another process, while the daemon runs.
        out = ok(
            await asyncio.to_thread(mailctl, data, "queue", "release", "--account", ALICE.upper())
        )
        assert f"2 queue entries of {ALICE} released; account no longer held" in out
        assert await held_subjects(node) == (set(), {f"{tag}-1", f"{tag}-2", f"{tag}-bob"})
        # The running daemon sees the flag gone at once: her next message is not held.
        assert await send(node, ctx, False, ALICE, ALICE_PW, rcpts("e", 1), f"{tag}-3") is None
        held, free = await held_subjects(node)
        assert held == set() and f"{tag}-3" in free

        # Over again (3 recipients counted so far), not released this time.
        got = await send(node, ctx, False, ALICE, ALICE_PW, rcpts("f", RCPT_LIMIT - 2), f"{tag}-y")
        assert got == refusal(RCPT_LIMIT, "recipients")
        assert (await held_subjects(node))[0] == {f"{tag}-1", f"{tag}-2", f"{tag}-3"}

    # The daemon restarts (its in-process counts start again at zero): the hold stays.
    async with instance(site_settings(data, tmp_path), tls_context, accounts=False) as node:
        ctx = client_tls_context
        assert await send(node, ctx, False, ALICE, ALICE_PW, rcpts("g", 1), f"{tag}-4") is None
        assert await send(node, ctx, False, BOB, BOB_PW, rcpts("h", 1), f"{tag}-bob2") is None
        held, free = await held_subjects(node)
        assert held == {f"{tag}-1", f"{tag}-2", f"{tag}-3", f"{tag}-4"}
        assert free == {f"{tag}-bob", f"{tag}-bob2"}
        out = ok(await asyncio.to_thread(mailctl, data, "queue", "list"))
        assert f"held: sending limit: {ALICE}: account held after going over a limit" in out
