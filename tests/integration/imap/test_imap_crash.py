"""No mail is lost: an APPEND's tagged OK means the message is durable.

imapd runs as a real process (``python -m imapd -c FILE``) while several
clients APPEND as fast as it answers; it is killed with SIGKILL in the
middle of that, with commands in every stage of the ingest path. After
the restart every message whose OK a client read is in the mailbox with
its exact bytes, none is there twice, and no message row names a blob
that cannot be read (a small message's blob commits in the same
transaction as its rows: ``storage/ingest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from storage import open_storage
from storage.model import UidSet
from tests.integration.test_cross_process_push import (
    ALICE,
    ALICE_PW,
    Lines,
    prepare_site,
    start_daemon,
    stop,
)

CLIENTS = 8
# Kill once this many APPENDs were acknowledged: by then every client has
# commands in flight.
KILL_AFTER = 120


def message(client: int, n: int) -> bytes:
    """A distinct message of a few KB (a typical mail, stored inline)."""
    filler = b"".join(b"line %d of message %d.%d\r\n" % (i, client, n) for i in range(150))
    return (
        b"From: alice@example.net\r\nTo: alice@example.net\r\n"
        b"Subject: crash %d.%d\r\nMessage-ID: <crash-%d-%d@example.net>\r\n\r\n"
        % (client, n, client, n)
    ) + filler


async def appender(port: int, client: int, acked: list[bytes], enough: asyncio.Event) -> None:
    """APPENDs until the connection dies; records each message whose
    tagged OK arrived (RFC 3501 section 6.3.11: OK means it was appended)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    imap = Lines(reader, writer)
    try:
        await imap.until("* OK")
        await imap.send(f'a LOGIN {ALICE} "{ALICE_PW}"')
        assert (await imap.until("a "))[-1].startswith("a OK")
        n = 0
        while True:
            raw = message(client, n)
            # LITERAL+ (RFC 7888): the literal follows without a continuation.
            writer.write(b"t%d APPEND INBOX {%d+}\r\n" % (n, len(raw)) + raw + b"\r\n")
            await writer.drain()
            reply = (await imap.until(f"t{n} "))[-1]
            assert reply.startswith(f"t{n} OK"), reply
            acked.append(raw)
            if len(acked) >= KILL_AFTER:
                enough.set()
            n += 1
    except (AssertionError, ConnectionError, asyncio.IncompleteReadError):
        pass  # the server was killed under it
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_sigkill_during_appends_loses_no_acknowledged_message(tmp_path: Path) -> None:
    settings, config, ports = await prepare_site(tmp_path)
    proc = await start_daemon("imapd", config, ports["imap"])
    acked: list[bytes] = []
    enough = asyncio.Event()
    try:
        clients = [
            asyncio.ensure_future(appender(ports["imap"], c, acked, enough)) for c in range(CLIENTS)
        ]
        await asyncio.wait_for(enough.wait(), 60)
        os.kill(proc.pid, signal.SIGKILL)  # APPENDs in flight on every client
        await proc.wait()
        await asyncio.gather(*clients)
    finally:
        await stop(proc)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= KILL_AFTER

    store = await open_storage(settings.storage)
    try:
        account = await store.directory.get_account(ALICE)
        mail = store.mail(account)
        inbox = await mail.get_mailbox(account.id, "INBOX")
        stored = await mail.fetch(account.id, inbox.id, UidSet.all())
        # Every row's blob is readable: none points at bytes that never landed.
        raws = [await store.blobs.get(s.entry.blob_key) for s in stored]
    finally:
        await store.close()
    assert len(raws) == len(set(raws))  # nothing twice
    missing = set(acked) - set(raws)
    assert not missing, f"{len(missing)} acknowledged APPENDs lost"
    # Only what a client sent is there (an APPEND in flight may have landed).
    sent_ids = {raw.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0] for raw in raws}
    assert all(i.startswith(b"<crash-") for i in sent_ids)
