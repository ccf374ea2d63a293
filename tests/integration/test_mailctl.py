"""mailctl as a sysadmin runs it: a subprocess with -o overrides, passwords on stdin."""

from __future__ import annotations

import asyncio
import mailbox
import subprocess
import sys
from pathlib import Path

import pytest

from conf.settings import load_settings
from storage.model import FLAGGED, SEEN, UidSet


def mailctl(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mailctl",
            *args[:1],
            "-o",
            f"server.data_dir={data_dir}",
            *args[1:],
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


async def _with_storage(data_dir: Path, action):
    from storage import open_storage

    storage = await open_storage(load_settings(overrides=[f"server.data_dir={data_dir}"]).storage)
    try:
        return await action(storage)
    finally:
        await storage.close()


def run_with_storage(data_dir: Path, action):
    return asyncio.run(_with_storage(data_dir, action))


def test_domain_account_alias_lifecycle(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "Example.ORG"))
    assert ok(mailctl(data, "domain", "list")).split() == ["example.org"]

    out = ok(mailctl(data, "account", "add", "alice@example.org", stdin="pw-alice\n"))
    assert "alice@example.org" in out
    ok(mailctl(data, "account", "add", "bob@example.org", "--quota", "1M", stdin="pw-bob\n"))
    listing = ok(mailctl(data, "account", "list"))
    assert "alice@example.org" in listing and "quota=1048576" in listing

    # The password never appears on argv; a duplicate or unknown domain is a clean error.
    dup = mailctl(data, "account", "add", "alice@example.org", stdin="x\n")
    assert dup.returncode == 1 and "Traceback" not in dup.stderr
    nodomain = mailctl(data, "account", "add", "carol@nowhere.test", stdin="x\n")
    assert nodomain.returncode == 1 and "Traceback" not in nodomain.stderr

    ok(mailctl(data, "alias", "add", "postmaster@example.org", "alice@example.org"))
    assert "postmaster@example.org\talice@example.org" in ok(mailctl(data, "alias", "list"))

    ok(mailctl(data, "account", "passwd", "alice@example.org", stdin="new-pw\n"))

    async def check(storage):
        d = storage.directory
        assert await d.authenticate("alice@example.org", "new-pw") is not None
        assert await d.authenticate("alice@example.org", "pw-alice") is None
        route = await d.resolve("postmaster@example.org")
        assert [a.address for a in route.accounts] == ["alice@example.org"]
        names = {
            m.name
            for m in await storage.mail(route.accounts[0]).list_mailboxes(route.accounts[0].id)
        }
        assert {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"} <= names

    run_with_storage(data, check)

    ok(mailctl(data, "alias", "remove", "postmaster@example.org"))
    ok(mailctl(data, "account", "remove", "bob@example.org"))
    assert "bob@" not in ok(mailctl(data, "account", "list"))


def test_empty_password_and_missing_arguments_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "example.org"))
    empty = mailctl(data, "account", "add", "a@example.org", stdin="\n")
    assert empty.returncode != 0 and "empty password" in empty.stderr
    missing = mailctl(data, "alias", "add", "x@example.org")
    assert missing.returncode == 2 and "target is required" in missing.stderr


def _message(n: int) -> bytes:
    return (
        f"From: sender{n}@example.net\nTo: alice@example.org\nSubject: import {n}\n"
        f"Message-ID: <imp{n}@example.net>\n\nbody number {n}\nFrom the start of a line\n"
    ).encode()


@pytest.mark.parametrize("kind", ["mbox", "maildir"])
def test_import_keeps_every_message_and_its_flags(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "example.org"))
    ok(mailctl(data, "account", "add", "alice@example.org", stdin="pw\n"))
    source = tmp_path / kind
    if kind == "mbox":
        box: mailbox.Mailbox = mailbox.mbox(source)
        for n in range(25):
            msg = mailbox.mboxMessage(_message(n))
            msg.set_flags("RO" if n % 2 else "O")
            if n % 5 == 0:
                msg.add_flag("F")
            box.add(msg)
    else:
        box = mailbox.Maildir(source)
        for n in range(25):
            msg = mailbox.MaildirMessage(_message(n))
            msg.set_subdir("cur")
            msg.set_flags(("S" if n % 2 else "") + ("F" if n % 5 == 0 else ""))
            box.add(msg)
    box.close()

    result = ok(mailctl(data, "import", kind, "alice@example.org", "Old", "--from", str(source)))
    assert "imported 25 messages" in result

    async def check(storage):
        account = await storage.directory.get_account("alice@example.org")
        mail = storage.mail(account)
        box = await mail.get_mailbox(account.id, "Old")
        entries = await mail.uids(account.id, box.id)
        assert len(entries) == 25
        seen = sum(SEEN in e.flags for e in entries)
        flagged = sum(FLAGGED in e.flags for e in entries)
        assert (seen, flagged) == (12, 5)
        subjects = sorted(
            m.parsed.subject for m in await mail.fetch(account.id, box.id, UidSet.all())
        )
        assert subjects == sorted(f"import {n}" for n in range(25))

    run_with_storage(data, check)


def test_import_of_a_missing_source_is_a_clean_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "example.org"))
    ok(mailctl(data, "account", "add", "alice@example.org", stdin="pw\n"))
    res = mailctl(data, "import", "mbox", "alice@example.org", "--from", str(tmp_path / "nope"))
    assert res.returncode == 1 and "not an mbox" in res.stderr
