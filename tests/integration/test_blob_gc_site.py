"""Blob garbage collection in a real site (issue #21): the daemons' loop
(``storage.gc_interval_seconds``) while clients deliver over SMTP messages
sharing attachments and expunge over IMAP, on the filesystem and on S3
(Swift); and ``mailctl blobs gc`` (dry run, the lease, what it removed)."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import re
import smtplib
import threading
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from conf.settings import StorageSettings
from storage.backend import open_storage
from storage.blob.gc import LEASE_NAME
from tests.integration.sitehelp import Site
from tests.integration.test_serve import serve_log

PASSWORD = "pw-gc-1"
CLIENTS = 10


def _message(rng: random.Random, tag: str, attachments: list[bytes]) -> bytes:
    """A message with random text and one or two of the shared attachments
    (base64, over the 64 KiB at which parts are stored once)."""
    parts = rng.sample(attachments, rng.randint(1, 2))
    out = (
        f"From: b@example.net\r\nSubject: {tag}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\n'
        f"{rng.randbytes(rng.randint(1, 3000)).hex()}\r\n"
    ).encode()
    for part in parts:
        out += b"--x\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        out += part
    return out + b"--x--\r\n"


def _inbox(site: Site, user: str) -> dict[bytes, tuple[bytes, bytes]]:
    """Subject -> (UID, whole message) of every INBOX message."""
    imap = site.imap(user, PASSWORD)
    try:
        imap.select("INBOX")
        status, found = imap.uid("SEARCH", "ALL")
        assert status == "OK"
        out = {}
        for uid in found[0].split():
            status, parts = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            assert status == "OK"
            whole = parts[0][1]
            subject = re.search(rb"\r\nSubject: ([^\r]*)\r\n", whole)
            assert subject is not None, (uid, len(whole), whole[:400], parts[1:])
            out[subject[1]] = (uid, whole)
        return out
    finally:
        imap.logout()


def _expunge(site: Site, user: str, uids: list[bytes]) -> None:
    """RFC 3501 sections 6.4.6 (STORE +FLAGS \\Deleted) and 6.4.3 (EXPUNGE)."""
    imap = site.imap(user, PASSWORD)
    try:
        imap.select("INBOX")
        status, _ = imap.uid("STORE", b",".join(uids), "+FLAGS.SILENT", r"(\Deleted)")
        assert status == "OK"
        assert imap.expunge()[0] == "OK"
    finally:
        imap.logout()


def _problems(site: Site) -> list[str]:
    """The daemons' warnings and errors so far (why a read came back wrong)."""
    lines = serve_log(site.proc).lines if site.proc is not None else []
    return [line for line in lines if " WARNING " in line or " ERROR " in line][-30:]


def _stored_bytes(site: Site) -> int:
    found = re.search(r"bytes stored: (\d+)", site.must("blobs", "stats"))
    assert found is not None
    return int(found[1])


@pytest.mark.timeout(600)  # 10 clients and daemons on a 2-core machine with other tests
@pytest.mark.parametrize("backend", ["fs", "s3"])
def test_gc_loop_while_clients_deliver_and_expunge_loses_nothing(
    tmp_path: Path, backend: str
) -> None:
    """GC every 0.2 s (grace 1 s) in the daemons while 10 clients each send
    messages sharing attachments and expunge about half of them: every
    acknowledged message not expunged reads back byte-exact, `blobs verify`
    is clean, and the loop reclaims every expunged blob by itself."""
    site = Site(
        tmp_path,
        backend,
        "storage.gc_interval_seconds=0.2",
        "storage.gc_grace_seconds=1",
        f"auth.verify_queue_per_ip={2 * CLIENTS}",  # every client logs in from 127.0.0.1
    )
    users = [f"user{n}@example.org" for n in range(CLIENTS)]
    site.add_accounts(users, PASSWORD)
    attachments = [
        base64.encodebytes(os.urandom(random.randint(70_000, 300_000))).replace(b"\n", b"\r\n")
        for _ in range(4)
    ]
    kept: dict[str, dict[bytes, bytes]] = {u: {} for u in users}
    failures: list[BaseException] = []

    def client(n: int, user: str) -> None:
        rng = random.Random()
        try:
            for round_ in range(3):
                sent = {}
                with site.smtp() as smtp:
                    for m in range(rng.randint(2, 4)):
                        tag = f"{n}-{round_}-{m}-{rng.random()}".encode()
                        message = _message(rng, tag.decode(), attachments)
                        assert smtp.sendmail("b@example.net", [user], message) == {}
                        sent[tag] = message
                inbox = _inbox(site, user)
                drop = [t for t in sent if rng.random() < 0.5]
                if drop:
                    _expunge(site, user, [inbox[t][0] for t in drop])
                kept[user].update({t: m for t, m in sent.items() if t not in drop})
        except BaseException as err:  # reported by the main thread
            failures.append(err)

    site.start()
    try:
        threads = [threading.Thread(target=client, args=(n, u)) for n, u in enumerate(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not failures, (failures, _problems(site))
        for user in users:
            inbox = _inbox(site, user)
            assert set(inbox) == set(kept[user])
            for tag, message in kept[user].items():
                got = inbox[tag][1]
                assert got.endswith(message)  # below the MX's trace fields
                assert got[: -len(message)].startswith((b"Return-Path:", b"Received:"))
        # The loop reclaims the expunged blobs by itself, once past the grace.
        # The dry run takes the lease too: refused (75) while the loop holds it,
        # which on a loaded machine may be nearly always (every daemon process
        # runs the loop, a pass every 0.2 s). So after a while the site stops
        # (its loops release the lease) and the dry run asks once more: what
        # the loops left, which must be nothing.
        deadline = time.monotonic() + 120
        while True:
            dry = site.mailctl("blobs", "gc", "--dry-run", "--grace", "0", "-q")
            assert dry.returncode in (0, 75), dry.stderr
            if dry.stdout.startswith("would remove 0 blobs"):
                break
            if time.monotonic() > deadline:
                site.stop()
                dry = site.mailctl("blobs", "gc", "--dry-run", "--grace", "0", "-q")
                break
            time.sleep(0.5)
        assert dry.returncode == 0 and dry.stdout.startswith("would remove 0 blobs"), dry
    finally:
        site.stop()
    done = site.mailctl("blobs", "verify", "-q")
    assert done.returncode == 0, done.stderr


def test_mailctl_blobs_gc_reports_and_honours_the_lease(tmp_path: Path) -> None:
    """`blobs gc --dry-run` counts what an expunge left and deletes
    nothing; while another instance holds the lease `blobs gc` exits 75
    (EX_TEMPFAIL) and says why; then it removes exactly that, and the
    kept messages read back byte-exact."""
    site = Site(tmp_path, "fs", "storage.gc_interval_seconds=0")
    user = "alice@example.org"
    site.add_accounts([user], PASSWORD)
    rng = random.Random()
    attachments = [
        base64.encodebytes(os.urandom(rng.randint(70_000, 200_000))).replace(b"\n", b"\r\n")
        for _ in range(3)
    ]
    sent = {}
    site.start()
    try:
        with site.smtp() as smtp:
            for m in range(6):
                message = _message(rng, f"m{m}", attachments)
                assert smtp.sendmail("b@example.net", [user], message) == {}
                sent[f"m{m}".encode()] = message
        inbox = _inbox(site, user)
        drop = rng.sample(sorted(sent), 3)
        _expunge(site, user, [inbox[t][0] for t in drop])
    finally:
        site.stop()
    before = _stored_bytes(site)
    blobs = {p for p in site.blob_dir.rglob("*") if p.is_file()}

    dry = site.must("blobs", "gc", "--dry-run", "--grace", "0", "-q")
    count, size = map(int, re.match(r"would remove (\d+) blobs, (\d+) bytes", dry).groups())  # type: ignore[union-attr]
    assert count >= 1 and size >= 1
    assert {p for p in site.blob_dir.rglob("*") if p.is_file()} == blobs
    young = site.must("blobs", "gc", "-q")  # the default grace: all too young
    assert young.startswith("removed 0 blobs, 0 bytes"), young

    async def hold(take: bool) -> None:
        hasher = PasswordHasher.from_parameters(CHEAPEST)
        storage = await open_storage(StorageSettings(), data_dir=site.data, password_hasher=hasher)
        try:
            store = storage.stores["default"]
            if take:
                assert await store.acquire_lock(LEASE_NAME, "another-host:1", 600.0)
            else:
                await store.release_lock(LEASE_NAME, "another-host:1")
        finally:
            await storage.close()

    asyncio.run(hold(True))
    refused = site.mailctl("blobs", "gc", "--grace", "0")
    assert refused.returncode == 75, refused
    assert "another instance" in refused.stderr and "Traceback" not in refused.stderr
    asyncio.run(hold(False))

    done = site.must("blobs", "gc", "--grace", "0", "-q")
    assert done.startswith(f"removed {count} blobs, {size} bytes"), (done, dry)
    assert _stored_bytes(site) == before - size
    assert site.mailctl("blobs", "verify", "-q").returncode == 0
    assert site.must("blobs", "gc", "--grace", "0", "-q").startswith("removed 0 blobs")
    bad = site.mailctl("blobs", "gc", "--grace", "-1")
    assert bad.returncode != 0 and "seconds must be 0 or more" in bad.stderr
    site.start()
    try:
        inbox = _inbox(site, user)
    finally:
        site.stop()
    assert set(inbox) == set(sent) - set(drop)
    for tag, (_, got) in inbox.items():
        assert got.endswith(sent[tag])


def test_sigkill_during_ingest_then_gc_leaves_no_referenced_blob_missing(tmp_path: Path) -> None:
    """The whole site SIGKILLed while clients send messages sharing an
    attachment (GC running every 0.2 s): after a restart the GC loop
    removes what the dead ingests left, every message the MX acknowledged
    reads back byte-exact and `blobs verify` is clean."""
    site = Site(tmp_path, "fs", "storage.gc_interval_seconds=0.2", "storage.gc_grace_seconds=1")
    user = "alice@example.org"
    site.add_accounts([user], PASSWORD)
    attachments = [
        base64.encodebytes(os.urandom(random.randint(70_000, 400_000))).replace(b"\n", b"\r\n")
        for _ in range(2)
    ]
    acked: dict[bytes, bytes] = {}
    stop = threading.Event()

    def sender(n: int) -> None:
        rng = random.Random()
        while not stop.is_set():
            tag = f"{n}-{rng.random()}".encode()
            message = _message(rng, tag.decode(), attachments)
            try:
                with site.smtp() as smtp:
                    if smtp.sendmail("b@example.net", [user], message) == {}:
                        acked[tag] = message
            except (OSError, smtplib.SMTPException):  # killed under it: not acknowledged
                time.sleep(0.05)

    site.start()
    threads = [threading.Thread(target=sender, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.5))
        site.kill()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert acked, "nothing was delivered before the kill"
    site.start()
    try:
        deadline = time.monotonic() + 120
        while True:  # until the loop has removed what the killed ingests left
            dry = site.mailctl("blobs", "gc", "--dry-run", "--grace", "0", "-q")
            assert dry.returncode in (0, 75), dry.stderr
            if dry.stdout.startswith("would remove 0 blobs") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert dry.stdout.startswith("would remove 0 blobs"), dry
        inbox = _inbox(site, user)
    finally:
        site.stop()
    for tag, message in acked.items():
        assert tag in inbox, "an acknowledged message is lost"
        assert inbox[tag][1].endswith(message)
    done = site.mailctl("blobs", "verify", "-q")
    assert done.returncode == 0, done.stderr
