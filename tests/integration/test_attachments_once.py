"""Attachments stored once (issue #21): MIME leaf parts above
``storage.attachment_min_bytes`` are kept as blobs of their own and the
message as a skeleton referencing them (``storage/blob/skeleton.py``).
These tests run the real site (`mailctl serve`), deliver over SMTP and
read back with real clients, on the filesystem and on S3 (Swift)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
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
from storage.ingest import Delivery, ingest
from storage.mime import parse_message
from tests.integration.sitehelp import Site
from tests.mimetrees import MimeTrees

USER, PASSWORD = "alice@example.org", "pw-attachments-1"
FIXTURES = Path(__file__).parent.parent / "fixtures" / "mime"


def _corpus() -> list[bytes]:
    """The fixture corpus as SMTP carries it: CRLF line ends, no NUL
    (RFC 5321 section 2.3.8; the corpus tests the MIME, not the transport)."""
    out = []
    for path in sorted(FIXTURES.glob("*.eml")):
        data = re.sub(rb"\r?\n", b"\r\n", path.read_bytes()).replace(b"\0", b"?")
        out.append(data if data.endswith(b"\r\n") else data + b"\r\n")
    return out


def _received(sent: bytes, got: bytes) -> None:
    """``got`` is ``sent`` with only the MX's trace fields above it
    (RFC 5321 section 4.4)."""
    assert got.endswith(sent), (len(sent), len(got))
    assert got[: -len(sent)].startswith((b"Return-Path:", b"Received:"))


def _imap_read(site: Site, rng: random.Random) -> list[bytes]:
    """Every INBOX message via BODY.PEEK[], each also checked through a
    random partial fetch and BODY.PEEK[TEXT] against the whole."""
    imap = site.imap(USER, PASSWORD)
    try:
        imap.select("INBOX", readonly=True)
        status, found = imap.uid("SEARCH", "ALL")
        assert status == "OK"
        out = []
        for uid in found[0].split():
            status, parts = imap.uid("FETCH", uid, "(BODY.PEEK[])")
            assert status == "OK"
            whole = parts[0][1]
            out.append(whole)
            start = rng.randint(0, len(whole))
            length = rng.randint(0, len(whole) - start + 5)
            status, parts = imap.uid("FETCH", uid, f"(BODY.PEEK[]<{start}.{length}>)")
            assert status == "OK"
            assert parts[0][1] == whole[start : start + length]  # RFC 3501 section 6.4.5
            status, parts = imap.uid("FETCH", uid, "(BODY.PEEK[TEXT])")
            assert status == "OK"
            assert parts[0][1] == whole[parse_message(whole).body.body_start :]
        return out
    finally:
        imap.logout()


def _pop3_read(site: Site) -> list[bytes]:
    """Every message via RETR (RFC 1939 section 7), dot-unstuffed by poplib."""
    pop = site.pop3(USER, PASSWORD)
    try:
        count, _ = pop.stat()
        out = []
        for n in range(1, count + 1):
            _, lines, _ = pop.retr(n)
            out.append(b"\r\n".join(lines) + b"\r\n")
        return out
    finally:
        pop.quit()


def _stats(site: Site) -> dict[str, int]:
    out = site.must("blobs", "stats")
    numbers = {
        name: int(m[1])
        for name, pattern in (
            ("blobs", r"blobs: (\d+)"),
            ("attachments", r"\((\d+) attachment blobs\)"),
            ("stored", r"bytes stored: (\d+)"),
            ("referenced", r"bytes referenced: (\d+)"),
        )
        if (m := re.search(pattern, out))
    }
    assert len(numbers) == 4, out
    return numbers


@pytest.mark.parametrize("backend", ["fs", "s3"])
def test_random_mime_trees_and_the_corpus_read_back_byte_exact(
    tmp_path: Path, backend: str
) -> None:
    seed = int(os.environ.get("SHARDMAIL_TEST_SEED") or random.randrange(2**32))
    print(f"seed {seed} (SHARDMAIL_TEST_SEED={seed} repeats the run)")
    rng = random.Random(seed)
    threshold = rng.randint(700, 5000)
    site = Site(tmp_path, backend, f"storage.attachment_min_bytes={threshold}")
    site.add_accounts([USER], PASSWORD)
    trees = MimeTrees(rng, threshold)
    sent = [trees.message() for _ in range(rng.randint(30, 45))] + _corpus()
    site.start()
    try:
        with site.smtp() as smtp:
            for message in sent:
                refused = smtp.sendmail("bob@example.net", [USER], message, ["BODY=8BITMIME"])
                assert refused == {}
        imap = _imap_read(site, rng)
        pop3 = _pop3_read(site)
        api = site.api_raw_messages(USER, PASSWORD)
    finally:
        site.stop()
    assert len(imap) == len(sent)
    for message, got in zip(sent, imap, strict=True):
        _received(message, got)
    assert pop3 == imap
    assert sorted(api) == sorted(imap)
    stats = _stats(site)
    assert stats["attachments"] > 0  # the trees had parts over the threshold: split
    site.must("blobs", "verify")


def test_one_attachment_in_100_accounts_is_stored_once(tmp_path: Path) -> None:
    """The same 5 MB attachment in 100 different messages (own headers and
    text) to 100 accounts: `mailctl blobs stats` shows one copy of it. The
    messages go through the ingest every entry point uses (SMTP's is
    exercised above; 100 x 7 MB over SMTP would take minutes here)."""
    users = [f"user{n}@example.org" for n in range(100)]
    site = Site(tmp_path, "fs")
    attachment = base64.encodebytes(os.urandom(5_000_000 + random.randint(1, 99_999)))
    attachment = attachment.replace(b"\n", b"\r\n")
    messages = []
    for n, user in enumerate(users):
        text = os.urandom(random.randint(10, 3000)).hex()
        messages.append((user, (
            f"From: sender@example.net\r\nTo: {user}\r\nSubject: report {n}\r\n"
            f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b{n}"\r\n'
            f"\r\n--b{n}\r\nContent-Type: text/plain\r\n\r\n{text}\r\n--b{n}\r\n"
            "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ).encode() + attachment + f"--b{n}--\r\n".encode()))  # fmt: skip
    asyncio.run(_ingest_all(site, messages))
    stats = _stats(site)
    copy = len(attachment) - 2  # the part's body ends before the CRLF of the boundary
    assert stats["referenced"] > 100 * copy
    # One copy of the attachment, and 100 small skeletons (a few KiB each).
    assert copy <= stats["stored"] < copy + 100 * 10_000, stats
    assert stats["attachments"] == 1
    site.must("blobs", "verify")


async def _ingest_all(site: Site, messages: list[tuple[str, bytes]]) -> None:
    """Each message stored for its account (made here, with cheap password
    hashes) by :func:`storage.ingest.ingest`, in the site's storage (the
    defaults `mailctl` opens: data_dir)."""
    hasher = PasswordHasher.from_parameters(CHEAPEST)
    storage = await open_storage(StorageSettings(), data_dir=site.data, password_hasher=hasher)
    try:
        await storage.directory.add_domain("example.org")
        for address, raw in messages:
            account = await storage.directory.add_account(address, PASSWORD)
            await ingest(storage, [Delivery(account)], raw)
    finally:
        await storage.close()


def test_verify_finds_a_deleted_and_a_corrupted_attachment_blob(tmp_path: Path) -> None:
    site = Site(tmp_path, "fs")
    site.add_accounts([USER], PASSWORD)
    bodies = [
        base64.encodebytes(os.urandom(random.randint(300_000, 700_000))).replace(b"\n", b"\r\n")
        for _ in range(3)
    ]
    site.start()
    try:
        with site.smtp() as smtp:
            for n, body in enumerate(bodies):
                message = (
                    f"From: b@example.net\r\nSubject: {n}\r\nMIME-Version: 1.0\r\n"
                    f'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n'
                    "Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                ).encode() + body + b"--x--\r\n"
                assert smtp.sendmail("b@example.net", [USER], message) == {}
    finally:
        site.stop()
    # The part's body is its bytes up to the CRLF before the boundary
    # (RFC 2046 section 5.1.1): that is the attachment blob's key.
    keys = [hashlib.sha256(body[:-2]).hexdigest() for body in bodies]
    assert site.mailctl("blobs", "verify", "-q").returncode == 0
    files = [site.blob_dir / k[:2] / k for k in keys]
    if not all(f.exists() for f in files):  # packed: small enough for the pack
        pytest.fail("attachment blobs expected as files (over the pack's size)")
    files[0].unlink()
    data = bytearray(files[1].read_bytes())
    data[random.randrange(len(data))] ^= 0x20
    files[1].write_bytes(bytes(data))
    done = site.mailctl("blobs", "verify")
    assert done.returncode == 1
    assert f"attachment blob {keys[0]} missing" in done.stderr, done.stderr
    assert f"attachment blob {keys[1]} is corrupt" in done.stderr, done.stderr
    assert keys[2] not in done.stderr
    assert "Traceback" not in done.stderr


def test_sigkill_during_ingest_leaves_no_referenced_blob_missing(tmp_path: Path) -> None:
    """mtad killed (SIGKILL, the whole site) while clients send big messages
    with attachments: after a restart `blobs verify` is clean and every
    message the MX acknowledged is there, byte-exact."""
    site = Site(tmp_path, "fs")
    site.add_accounts([USER], PASSWORD)
    shared = base64.encodebytes(os.urandom(random.randint(300_000, 900_000)))
    acked: list[bytes] = []
    stop = threading.Event()

    def sender(n: int) -> None:
        while not stop.is_set():
            own = base64.encodebytes(os.urandom(random.randint(70_000, 2_000_000)))
            message = (
                f"From: b@example.net\r\nSubject: {n} {time.monotonic_ns()}\r\n"
                f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="x"\r\n\r\n'
                "--x\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            ).encode() + (shared + b"--x\r\nContent-Transfer-Encoding: base64\r\n\r\n" + own)
            message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"--x--\r\n"
            try:
                with site.smtp() as smtp:
                    if smtp.sendmail("b@example.net", [USER], message) == {}:
                        acked.append(message)
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
    done = site.mailctl("blobs", "verify")
    assert done.returncode == 0, done.stderr
    site.start()
    try:
        got = _imap_read(site, random.Random())
    finally:
        site.stop()
    for message in acked:
        assert any(g.endswith(message) for g in got), "an acknowledged message is lost"
