"""``mailctl account move`` for real (issue #19): a mover process killed
with SIGKILL and run again, and the "done when" drill: an account holding
10,000 messages moves to another shard while an SMTP client delivers to it
through a real mtad and an IMAP client IDLEs on it in a real imapd; the
client's next QRESYNC SELECT then sees the same UIDVALIDITY, and every
acknowledged message is there exactly once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import re
import signal
import smtplib
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher, profiles

from conf.settings import Settings, load_settings
from conf.tls import server_context
from storage import open_storage
from storage.backend import SqlStorage
from storage.model import Account, UidSet
from tests.contract.mailfactory import build
from tests.integration.test_cross_process_push import (
    REPO,
    Lines,
    free_port,
    start_daemon,
    stop,
    write_config,
)
from tests.pgserver import PgServer

DOMAIN = "example.net"
BOB = f"bob@{DOMAIN}"
BOB_PW = "bob-secret"
HASHER = PasswordHasher.from_parameters(profiles.CHEAPEST)
MOVE_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer.start()  # raises (the test errors) if PostgreSQL cannot run
    try:
        yield server
    finally:
        server.stop()


async def _site(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest, **east: object
) -> Path:
    """A config with shards "default" and "east" (two SQLite files, or two
    PostgreSQL databases; ``east``: more keys of its table) and BOB on
    "default"; returns its path."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    storage_keys: dict[str, object] = {}
    if backend == "sqlite":
        east_url = f"sqlite+aiosqlite:///{data_dir / 'east.db'}"
    else:
        server: PgServer = request.getfixturevalue("pg")
        storage_keys["url"] = await server.create_database()
        storage_keys["blob_dir"] = str(data_dir / "blobs")
        east_url = await server.create_database()
    ports = {"mx": free_port(), "imap": free_port()}
    config = tmp_path / "shardmail.toml"
    write_config(
        config,
        data_dir,
        ports,
        storage=storage_keys,
        smtp={"rate_limit_per_ip": 0},  # one client sends hundreds of messages
        **{"storage.shards.east": {"url": east_url, **east}},
    )
    config.with_suffix(".ports").write_text(f"{ports['mx']} {ports['imap']}")
    settings = load_settings(config)
    async with _storage(settings) as store:
        await store.directory.add_domain(DOMAIN)
        await store.directory.add_account(BOB, BOB_PW, shard="default")
    await asyncio.to_thread(server_context, settings)
    return config


@contextlib.asynccontextmanager
async def _storage(settings: Settings) -> AsyncIterator[SqlStorage]:
    store = await open_storage(settings.storage, data_dir=settings.data_dir, password_hasher=HASHER)
    try:
        yield store
    finally:
        await store.close()


async def _fill(store: SqlStorage, account: Account, count: int) -> list[str]:
    """``count`` messages of random sizes in INBOX through the storage API
    (many deliveries at once share group commits); their Message-IDs."""
    mail = store.mail(account)
    rng = random.Random()
    ids = [f"<bulk{i}.{rng.randrange(10**9)}@{DOMAIN}>" for i in range(count)]

    async def one(message_id: str) -> None:
        body = "".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(10, 1500)))
        raw, parsed = build(subject="bulk", body=body, message_id=message_id, to=BOB)
        key = await store.blobs.put(raw) if len(raw) > mail.inline_blob_max else _sha(raw)
        inline = raw if len(raw) <= mail.inline_blob_max else None
        await mail.deliver(account.id, key, parsed, [("INBOX", (), None)], blob_data=inline)

    for start in range(0, count, 250):
        await asyncio.gather(*(one(m) for m in ids[start : start + 250]))
    return ids


def _sha(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


async def _message_ids(config: Path) -> tuple[str, collections.Counter[str], int]:
    """(BOB's shard, how often each Message-ID is in INBOX there, BOB's
    mailboxes left on the other shard)."""
    async with _storage(load_settings(config)) as store:
        account = await store.directory.get_account(BOB)
        mail = store.mail(account)
        inbox = await mail.get_mailbox(account.id, "INBOX")
        uids = [e.uid for e in await mail.uids(account.id, inbox.id)]
        found = await mail.fetch(account.id, inbox.id, UidSet.of(uids)) if uids else []
        other = "east" if account.shard == "default" else "default"
        try:
            left = len(await store.stores[other].list_mailboxes(account.id))
        except Exception:
            left = 0
        return account.shard, collections.Counter(m.parsed.message_id for m in found), left


async def _mover(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailctl", "account", "move", BOB, "--to", "east",
        "-c", str(config), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_killed_mover_is_resumed_by_running_it_again(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    config = await _site(tmp_path, backend, request)
    async with _storage(load_settings(config)) as store:
        ids = await _fill(store, await store.directory.get_account(BOB), random.randint(3000, 4000))
    proc = await _mover(config)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), MOVE_TIMEOUT)
    assert b"copy round 1" in line, line
    await asyncio.sleep(random.uniform(0.05, 0.4))  # somewhere in the copy
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    shard, counts, _ = await _message_ids(config)
    assert shard == "default" and set(counts) == set(ids)
    again = await _mover(config)
    out, err = await asyncio.wait_for(again.communicate(), MOVE_TIMEOUT)
    assert again.returncode == 0, err.decode()
    assert f"{BOB} is on shard east" in out.decode()
    shard, counts, left = await _message_ids(config)
    assert (shard, left) == ("east", 0)
    assert counts == collections.Counter(ids)


async def _until(done: Callable[[], bool], timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if done():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def _mailctl(config: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailctl", *args, "-c", str(config), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), MOVE_TIMEOUT)
    assert b"Traceback" not in out, out.decode()
    return proc.returncode or 0, out.decode()


async def test_shard_drain_moves_every_account_with_its_mail(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = await _site(tmp_path, "sqlite", request)
    async with _storage(load_settings(config)) as store:
        second = await store.directory.add_account(f"ann@{DOMAIN}", "pw", shard="default")
        ids = await _fill(store, second, random.randint(5, 50))
    assert (await _mailctl(config, "account", "move", BOB))[0] == 2  # no --to
    code, out = await _mailctl(config, "shard", "drain", "default")
    assert code == 0, out
    assert "2 accounts moved" in out
    async with _storage(load_settings(config)) as store:
        for account in await store.directory.list_accounts():
            assert account.shard == "east"
        ann = await store.directory.get_account(second.address)
        inbox = await store.mail(ann).get_mailbox(ann.id, "INBOX")
        found = await store.mail(ann).fetch(ann.id, inbox.id, UidSet(((1, None),)))
        assert sorted(m.parsed.message_id for m in found) == sorted(ids)


class Imap:
    """A raw IMAP4rev1 client (IDLE and QRESYNC need more than imaplib has)."""

    def __init__(self, lines: Lines) -> None:
        self.lines = lines
        self.tag = 0

    @classmethod
    async def connect(cls, port: int) -> Imap:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        imap = cls(Lines(reader, writer))
        await imap.lines.until("* OK")
        return imap

    async def command(self, text: str, timeout: float = 60.0) -> list[str]:
        self.tag += 1
        tag = f"a{self.tag}"
        await self.lines.send(f"{tag} {text}")
        seen = await self.lines.until(f"{tag} ", timeout)
        assert seen[-1].startswith(f"{tag} OK"), seen[-3:]
        return seen

    def close(self) -> None:
        self.lines.writer.close()


def _smtp_sender(port: int, stop_at: list[float], acked: list[str], deferred: list[int]) -> None:
    """Sends messages one by one with smtplib until ``stop_at[0]``; a 4xx
    reply (the fence) is retried with the same Message-ID, as an MTA does."""
    i = 0
    while time.monotonic() < stop_at[0]:
        message_id = f"<smtp{i}.{random.randrange(10**9)}@sender.example>"
        body = "x" * random.randint(1, 4000)
        msg = f"From: a@sender.example\r\nTo: {BOB}\r\nMessage-ID: {message_id}\r\n"
        msg += f"Subject: live {i}\r\n\r\n{body}\r\n"
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                    smtp.sendmail("a@sender.example", [BOB], msg)
                acked.append(message_id)
                break
            except (smtplib.SMTPRecipientsRefused, smtplib.SMTPResponseException) as exc:
                code = (
                    getattr(exc, "smtp_code", None)
                    or next(iter(getattr(exc, "recipients", {}).values()), (0,))[0]
                )
                assert 400 <= code < 500, exc  # temporary: never a bounce
                deferred.append(code)
                time.sleep(0.1)
        i += 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_move_under_smtp_and_idle_keeps_the_client_in_sync(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    config = await _site(tmp_path, backend, request)
    mx, imap_port = map(int, config.with_suffix(".ports").read_text().split())
    async with _storage(load_settings(config)) as store:
        bulk = await _fill(store, await store.directory.get_account(BOB), 10_000)
    procs = [await start_daemon("imapd", config, imap_port), await start_daemon("mtad", config, mx)]
    try:
        imap = await Imap.connect(imap_port)
        await imap.command(f"LOGIN {BOB} {BOB_PW}")
        await imap.command("ENABLE QRESYNC")
        selected = " ".join(await imap.command("SELECT INBOX"))
        uidvalidity = re.search(r"UIDVALIDITY (\d+)", selected).group(1)  # type: ignore[union-attr]
        modseq = re.search(r"HIGHESTMODSEQ (\d+)", selected).group(1)  # type: ignore[union-attr]
        await imap.lines.send("idle IDLE")
        await imap.lines.until("+ ")
        stop_at = [float("inf")]
        acked: list[str] = []
        deferred: list[int] = []
        sender = asyncio.create_task(asyncio.to_thread(_smtp_sender, mx, stop_at, acked, deferred))
        await _until(lambda: len(acked) >= 5)
        started = time.monotonic()
        mover = await _mover(config)
        _, err = await asyncio.wait_for(mover.communicate(), MOVE_TIMEOUT)
        took = time.monotonic() - started
        assert mover.returncode == 0, err.decode()
        # The IDLE session heard of the fence and ended: reconnect.
        heard = await imap.lines.until("* BYE", timeout=30)
        assert "[UNAVAILABLE]" in heard[-1]
        imap.close()
        during = len(acked)
        await _until(lambda: len(acked) >= during + 5)  # mail keeps arriving after the move
        stop_at[0] = 0
        await sender
        imap = await Imap.connect(imap_port)
        await imap.command(f"LOGIN {BOB} {BOB_PW}")
        await imap.command("ENABLE QRESYNC")
        # RFC 7162 section 3.2.5: the client resynchronises from what it knew.
        again = await imap.command(f"SELECT INBOX (QRESYNC ({uidvalidity} {modseq}))")
        assert f"[UIDVALIDITY {uidvalidity}]" in " ".join(again)
        exists = next(int(line.split()[1]) for line in again if line.endswith(" EXISTS"))
        assert exists == len(bulk) + len(acked)
        imap.close()
    finally:
        await asyncio.gather(*(stop(p) for p in procs))
    shard, counts, left = await _message_ids(config)
    assert (shard, left) == ("east", 0)
    assert counts == collections.Counter(bulk + acked)
    print(f"moved 10,000 messages in {took:.1f}s; {len(deferred)} SMTP deferrals")
