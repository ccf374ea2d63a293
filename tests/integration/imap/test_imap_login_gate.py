"""Logins under attack, with real clients over real sockets (storage/throttle.py).

Issue #18: a flood of wrong LOGINs that are abandoned after half a second
must not hold up an honest login from elsewhere. Issue #17: once a client
is throttled a correct password is answered as late as a wrong one, and the
count is shared by every protocol of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import poplib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from imapd.pop3.server import start_pop3_service
from tests.conftest import make_settings
from tests.protocol.imap.conftest import OTHER, PASSWORD, USER

CHECK_SECONDS = 0.15  # one argon2 verification at the production cost
ATTACKER = "127.0.0.1"
HONEST = "127.0.0.2"  # another loopback address: another client IP to the server


class SlowHasher(PasswordHasher):
    """Verifies like the production cost on a small machine: 150 ms each,
    one at a time (argon2 is CPU-bound; the cheap test profile is not)."""

    cpu = threading.Lock()

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        with self.cpu:
            time.sleep(CHECK_SECONDS)
            return super().verify(hash, password)


@contextlib.asynccontextmanager
async def imaps_from(
    env: Any, source: str
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """An IMAPS connection from loopback address ``source``, greeting read."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.tls_port, ssl=env.client_tls, local_addr=(source, 0)
    )
    try:
        await reader.readline()
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def abandoned_login(env: Any) -> None:
    """A wrong LOGIN, dropped after 0.5 s whether answered or not."""
    async with imaps_from(env, ATTACKER) as (reader, writer):
        writer.write(f"a1 LOGIN {USER} wrong-guess\r\n".encode())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.readline(), 0.5)


async def honest_login(env: Any) -> bytes:
    async with imaps_from(env, HONEST) as (reader, writer):
        writer.write(f"h1 LOGIN {OTHER} {PASSWORD}\r\n".encode())
        while True:
            line = await reader.readline()
            if line.startswith(b"h1 ") or not line:
                return line


async def test_abandoned_logins_do_not_delay_an_honest_one(imap_factory: Any) -> None:
    env = await imap_factory(auth={"verify_threads": 2, "verify_queue_per_ip": 8})
    env.storage.directory.hasher = SlowHasher.from_parameters(CHEAPEST)
    at_once = asyncio.Semaphore(40)

    async def one() -> None:
        async with at_once:
            await abandoned_login(env)

    # 200 wrong logins, 40 at a time: 30 s of verification if all of them ran.
    await asyncio.gather(*(one() for _ in range(200)), return_exceptions=True)
    started = time.monotonic()
    reply = await asyncio.wait_for(honest_login(env), 10)
    assert reply.startswith(b"h1 OK"), reply
    assert time.monotonic() - started < 2.0


async def test_a_throttled_correct_login_is_answered_as_late_as_a_wrong_one(
    imap_factory: Any,
) -> None:
    delay = 0.4
    env = await imap_factory(
        auth={"failure_delay_seconds": delay, "failure_delay_max_seconds": 4.0}
    )

    def login(password: str) -> float:
        started = time.monotonic()
        with imaplib.IMAP4("127.0.0.1", env.port) as imap:
            try:
                imap.login(USER, password)
            except imaplib.IMAP4.error as exc:
                assert "AUTHENTICATIONFAILED" in str(exc)
        return time.monotonic() - started

    assert await asyncio.to_thread(login, "wrong-1") < delay  # a clean record: no delay
    wrong = await asyncio.to_thread(login, "wrong-2")
    right = await asyncio.to_thread(login, PASSWORD)
    assert wrong >= delay * 0.95  # one failure so far: the base delay
    # Two failures now: a correct password waits out base * 2 too, so a client
    # that gives up early cannot tell it from a wrong one.
    assert right >= 2 * delay * 0.95


async def test_pop3_failures_slow_imap_logins_of_the_same_process(
    imap_factory: Any, tmp_path: Any, tls_context: Any, client_tls_context: Any
) -> None:
    delay = 0.4
    auth = {"allow_plaintext": True, "failure_delay_seconds": delay,
            "failure_delay_max_seconds": 4.0}
    env = await imap_factory(auth=auth)
    settings = make_settings(tmp_path / "pop3", auth=auth)
    pop3 = await start_pop3_service(settings, env.storage, tls_context)
    port = pop3.servers[0].sockets[0].getsockname()[1]

    def pop3_guess() -> None:
        pop = poplib.POP3("127.0.0.1", port)
        try:
            pop.user(USER)
            try:
                pop.pass_("wrong")
            except poplib.error_proto as exc:
                assert str(exc).startswith("b'-ERR [AUTH]")
        finally:
            pop.quit()

    def imap_login() -> float:
        started = time.monotonic()
        with imaplib.IMAP4("127.0.0.1", env.port) as imap:
            imap.login(USER, PASSWORD)
        return time.monotonic() - started

    try:
        for _ in range(2):
            await asyncio.to_thread(pop3_guess)
        assert await asyncio.to_thread(imap_login) >= 2 * delay * 0.95
    finally:
        await pop3.close()
