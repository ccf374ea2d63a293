"""What an idle logged-in IMAP connection costs the server (issue #24).

Measured with tracemalloc on the server's own allocations only (traces
with a frame in runtime/ or imapd/: the listener, the TLS layer, the
connection and its session), so the in-process test clients do not count.
The bounds leave room for interpreter differences; the costs they catch
are larger (asyncio's TLS read buffer of 256 KiB per
connection; about 5 KB of asyncio.Event and asyncio.Queue deques)."""

from __future__ import annotations

import asyncio
import random
import tracemalloc

from tests.protocol.imap.conftest import PASSWORD, USER, ImapClient, ImapEnv, message

SESSIONS = 10


def _server_bytes(snapshot: tracemalloc.Snapshot) -> int:
    kept = snapshot.filter_traces(
        [
            tracemalloc.Filter(True, "*/runtime/*", all_frames=True),
            tracemalloc.Filter(True, "*/imapd/*", all_frames=True),
        ]
    )
    return sum(trace.size for trace in kept.traces)


async def _idle_sessions(env: ImapEnv, how: str) -> list[ImapClient]:
    """SESSIONS clients logged in with INBOX selected: over implicit TLS,
    STARTTLS, or plaintext."""
    clients = []
    for _ in range(SESSIONS):
        if how == "tls":
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", env.tls_port, ssl=env.client_tls, server_hostname="127.0.0.1"
            )
            c = ImapClient(reader, writer)
            assert (await c.line()).startswith(b"* OK")
        else:
            c = await env.client()
            if how == "starttls":
                assert (await c.command("STARTTLS"))[-1].startswith(b"t1 OK")
                await c.writer.start_tls(env.client_tls, server_hostname="127.0.0.1")
        await c.ok(f"LOGIN {USER} {PASSWORD}")
        await c.ok("SELECT INBOX")
        clients.append(c)
    return clients


async def _per_session(env: ImapEnv, how: str) -> float:
    rng = random.Random(24)
    for i in range(5):
        await env.deliver(message(f"m{i}", "x" * rng.randrange(100, 5000) + "\r\n"))
    warm = await _idle_sessions(env, how)  # first-use costs (caches, imports) not counted
    for c in warm:
        await c.close()
    await asyncio.sleep(0.1)
    tracemalloc.start(32)
    try:
        before = _server_bytes(tracemalloc.take_snapshot())
        clients = await _idle_sessions(env, how)
        await asyncio.sleep(0.2)  # every reply sent: idle
        after = _server_bytes(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    for c in clients:
        await c.close()
    print(f"{how}: {(after - before) / SESSIONS / 1024:.1f} KiB per idle session")
    return (after - before) / SESSIONS


async def test_an_idle_tls_session_holds_no_read_buffer_of_its_own(imap_env: ImapEnv) -> None:
    """asyncio's TLS protocol gave each connection a 256 KiB read buffer,
    resident while it stayed open; now the event loop's one buffer serves
    them all (runtime/tlslayer.py)."""
    cost = await _per_session(imap_env, "tls")
    assert cost < 32 * 1024, f"{cost / 1024:.1f} KiB per idle TLS session"


async def test_an_idle_starttls_session_holds_no_read_buffer_of_its_own(
    imap_env: ImapEnv,
) -> None:
    """The same through STARTTLS (RFC 3501 section 6.2.1), which starts
    TLS on the open connection rather than at accept."""
    cost = await _per_session(imap_env, "starttls")
    assert cost < 32 * 1024, f"{cost / 1024:.1f} KiB per idle STARTTLS session"


async def test_an_idle_plaintext_session_costs_little(imap_env: ImapEnv) -> None:
    """No asyncio.Event or asyncio.Queue per connection (their deques of
    waiters cost about 760 octets each, seven per logged-in session)."""
    cost = await _per_session(imap_env, "plain")
    assert cost < 11 * 1024, f"{cost / 1024:.1f} KiB per idle session"
