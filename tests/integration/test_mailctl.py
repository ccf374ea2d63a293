"""mailctl as a sysadmin runs it: a subprocess with -o overrides, passwords on stdin."""

from __future__ import annotations

import asyncio
import imaplib
import json
import mailbox
import os
import random
import re
import socket
import ssl
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conf.settings import load_settings
from storage.model import FLAGGED, SEEN, UidSet
from tests.conftest import storage_url


def site(data_dir: Path) -> list[str]:
    """The ``-o`` overrides naming the test site of ``data_dir``: its data
    dir, and with ``SHARDMAIL_TEST_BACKEND=postgresql`` its database
    (tests/conftest.py ``storage_url``), so mailctl runs on both backends."""
    overrides = [f"server.data_dir={data_dir}"]
    url = storage_url(data_dir)
    if url is not None:
        overrides.append(f"storage.url={url}")
    return overrides


def site_args(data_dir: Path) -> list[str]:
    return [arg for override in site(data_dir) for arg in ("-o", override)]


def mailctl(data_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailctl", *args[:1], *site_args(data_dir), *args[1:]],
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

    storage = await open_storage(load_settings(overrides=site(data_dir)).storage)
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


def _mailctl_without_password(data_dir: Path, action: str, stdin: str) -> tuple[int, str]:
    """``mailctl account ACTION`` whose standard input gives no password:
    ``devnull`` (a cron job), ``closed`` (a daemon's ``<&-``), or ``tty-eof``
    (a terminal where the user types Ctrl-D at the prompt, no controlling
    terminal to open). Its exit status and standard error."""
    argv = [
        sys.executable,
        "-m",
        "mailctl",
        "account",
        *site_args(data_dir),
        action,
        "a@example.org",
    ]
    if stdin == "tty-eof":
        controller, terminal = os.openpty()
        proc = subprocess.Popen(
            argv,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        os.close(terminal)
        # Ctrl-D, the terminal's EOF character, until mailctl ends: the prompt
        # flushes what was typed before it.
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            os.write(controller, b"\x04")
            time.sleep(0.2)
        _, stderr = proc.communicate(timeout=10)
        os.close(controller)
        return proc.returncode, stderr
    else:
        before = (lambda: os.close(0)) if stdin == "closed" else None
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=before,
        )
    return done.returncode, done.stderr


@pytest.mark.parametrize("action", ["add", "passwd"])
@pytest.mark.parametrize("stdin", ["devnull", "closed", "tty-eof"])
def test_no_password_to_read_is_one_clear_line(tmp_path: Path, action: str, stdin: str) -> None:
    """With nowhere to read a password from, mailctl says so in one line and
    fails, instead of a traceback (EOFError, AttributeError)."""
    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "example.org"))
    if action == "passwd":
        ok(mailctl(data, "account", "add", "a@example.org", stdin="old-Secret-1\n"))
    status, stderr = _mailctl_without_password(data, action, stdin)
    assert status == 1, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--password-stdin" in lines[0], stderr


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


def _random_lines(rng: random.Random) -> list[bytes]:
    """Body lines of random text; none starts with "From " (mbox would
    escape it) and some hold a lone CR, as files written on old Macs do."""
    alphabet = string.ascii_letters + string.digits + " .,:;!?-_=+*/()<>@"
    lines = []
    for _ in range(rng.randint(1, 40)):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))).lstrip("F")
        if rng.random() < 0.1:
            cut = rng.randint(0, len(line))
            line = line[:cut] + "\r" + line[cut:]
        lines.append(line.encode())
    return lines


def _unix_message(rng: random.Random, n: int) -> bytes:
    """A message as a Unix tool stores it: LF line ends, with a stray CRLF."""
    head = [
        f"From: sender{n}@example.net",
        "To: alice@example.org",
        f"Subject: import {n} {rng.random()}",
        f"Message-ID: <lf{n}.{rng.getrandbits(64)}@example.net>",
    ]
    lines = [h.encode() for h in head] + [b""] + _random_lines(rng)
    ends = [b"\r\n" if rng.random() < 0.1 else b"\n" for _ in lines]
    return b"".join(line + end for line, end in zip(lines, ends, strict=True))


def _crlf(raw: bytes) -> bytes:
    """What SMTP would have stored: every line end CRLF (RFC 5322 section 2.1)."""
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _write_source(kind: str, path: Path, messages: list[bytes]) -> None:
    """The files byte for byte as a Unix mail tool writes them."""
    if kind == "mbox":
        with path.open("wb") as out:
            for raw in messages:
                out.write(b"From sender@example.net Sat Jan  3 01:05:34 1996\n" + raw + b"\n")
        return
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True)
    for n, raw in enumerate(messages):
        (path / "cur" / f"1700000000.{n}.host:2,S").write_bytes(raw)


async def _fetch_over_imap(data: Path, tls_context: ssl.SSLContext, mailbox: str) -> list[bytes]:
    """Every message of ``mailbox`` as imaplib FETCHes it, in UID order."""
    from imapd.imap.server import start_imap
    from storage import open_storage
    from tests.conftest import make_settings

    settings = make_settings(data, auth={"allow_plaintext": True}, imap={"listen": ["127.0.0.1:0"]})
    storage = await open_storage(settings.storage)
    servers = await start_imap(settings, storage, tls_context)
    port = servers[0].sockets[0].getsockname()[1]

    def fetch() -> list[bytes]:
        client = imaplib.IMAP4("127.0.0.1", port)
        try:
            assert client.login("alice@example.org", "pw")[0] == "OK"
            assert client.select(mailbox, readonly=True)[0] == "OK"
            typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
            assert typ == "OK", data
            return [part[1] for part in data if isinstance(part, tuple)]
        finally:
            client.logout()

    try:
        return await asyncio.to_thread(fetch)
    finally:
        for server in servers:
            server.close()
        await storage.close()


@pytest.mark.parametrize("kind", ["mbox", "maildir"])
def test_import_stores_crlf_line_ends_as_smtp_would(
    tmp_path: Path, kind: str, tls_context: ssl.SSLContext
) -> None:
    """RFC 5322 section 2.1 and RFC 3501 section 2.3.4 (BODY[] is the
    RFC 5322 message): lone LF and lone CR become CRLF on import, CRLF
    stays, and nothing else of the message changes."""
    rng = random.Random()
    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "example.org"))
    ok(mailctl(data, "account", "add", "alice@example.org", stdin="pw\n"))
    messages = [_unix_message(rng, n) for n in range(rng.randint(2, 6))]
    source = tmp_path / kind
    _write_source(kind, source, messages)
    ok(mailctl(data, "import", kind, "alice@example.org", "Old", "-q", "--from", str(source)))

    fetched = asyncio.run(_fetch_over_imap(data, tls_context, "Old"))
    bare = re.compile(rb"(?<!\r)\n|\r(?!\n)")
    assert all(bare.search(raw) is None for raw in fetched)
    assert sorted(fetched) == sorted(_crlf(raw) for raw in messages)


def _mailctl_argv(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailctl", *argv], capture_output=True, text=True, timeout=120
    )


def test_config_options_work_before_the_subcommand_and_after_it(tmp_path: Path) -> None:
    """Where -c and -o may stand; the sites are SQLite in their data dirs on
    every test backend, as the options name nothing but the data dir."""
    data = tmp_path / "data"
    ok(_mailctl_argv("-o", f"server.data_dir={data}", "domain", "add", "example.org"))
    assert ok(_mailctl_argv("domain", "list", "-o", f"server.data_dir={data}")).split() == [
        "example.org"
    ]

    config = tmp_path / "shardmail.toml"
    config.write_text(f'[server]\ndata_dir = "{data}"\n')
    ok(_mailctl_argv("-c", str(config), "domain", "add", "example.net"))
    assert ok(_mailctl_argv("domain", "list", "-c", str(config))).split() == [
        "example.net",
        "example.org",
    ]
    # Both places at once: every -o applies, the one after the subcommand last.
    other = tmp_path / "other"
    both = _mailctl_argv(
        "-c", str(config), "-o", "server.data_dir=/nonexistent/x",
        "domain", "-o", f"server.data_dir={other}", "add", "example.com",
    )  # fmt: skip
    ok(both)
    listed = _mailctl_argv("domain", "list", "-o", f"server.data_dir={other}")
    assert ok(listed).split() == ["example.com"]
    assert "example.com" not in ok(_mailctl_argv("domain", "list", "-o", f"server.data_dir={data}"))


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_check_config_connects_to_every_database_and_names_the_one_that_failed(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "example.org"))  # the default SQLite database exists
    good = ok(mailctl(data, "check-config"))
    assert "configuration OK" in good and "default" in good

    down = f"postgresql+asyncpg://shardmail:secret@127.0.0.1:{_closed_port()}/mail2"
    shards = f'storage.shards={{ "eu2" = "{down}" }}'
    failed = mailctl(data, "check-config", "-o", shards)
    assert failed.returncode == 1, failed.stdout
    assert "Traceback" not in failed.stderr
    assert "eu2" in failed.stderr and f"127.0.0.1:{down.split(':')[3]}" in failed.stderr
    assert "secret" not in failed.stderr + failed.stdout  # passwords stay out of logs
    assert "directory: OK" in failed.stdout  # the others are still checked and reported

    main_down = mailctl(data, "check-config", "-o", f"storage.url={down}")
    # Reported by role: the directory (here also shard "default") is down.
    assert main_down.returncode == 1 and "directory: cannot connect" in main_down.stderr

    skipped = mailctl(data, "check-config", "--no-connect", "-o", shards)
    assert skipped.returncode == 0, skipped.stderr
    assert "configuration OK" in skipped.stdout


def test_spam_lists_and_threshold_round_trip(tmp_path: Path) -> None:
    """``mailctl spam``: entries normalised onto one list at a time, junk
    refused (exit 2) before anything changes, the threshold set and cleared,
    all read back through storage as the MX reads them."""
    from storage.model import SpamPolicy

    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "example.org"))
    ok(mailctl(data, "account", "add", "bob@example.org", stdin="pw-bob\n"))
    bob = "bob@example.org"
    out = ok(mailctl(data, "spam", "allow", bob, "Boss@Corp.Example", "*.Partner.example"))
    assert "boss@corp.example: on the allow list" in out
    ok(mailctl(data, "spam", "block", "bob@example.org", "corp.example", "bücher.example"))
    moved = ok(mailctl(data, "spam", "block", "bob@example.org", "*.partner.example"))
    assert "was on the allow list" in moved
    ok(mailctl(data, "spam", "threshold", "bob@example.org", "-2.5"))
    shown = ok(mailctl(data, "spam", "show", "bob@example.org")).splitlines()
    assert shown == [
        "allow\tboss@corp.example",
        "block\t*.partner.example",
        "block\tcorp.example",
        "block\txn--bcher-kva.example",
        "threshold\t-2.5",
    ]

    async def policy_of(storage):
        account = await storage.directory.get_account("bob@example.org")
        return await storage.mail(account).spam_policy(account.id)

    expected = SpamPolicy(
        ("boss@corp.example",),
        ("*.partner.example", "corp.example", "xn--bcher-kva.example"),
        -2.5,
    )
    assert run_with_storage(data, policy_of) == expected
    # Junk input: exit 2 with the reason, nothing changed (the good entry neither).
    for args in (
        ("block", "bob@example.org", "ok.example", ".example.com"),
        ("allow", "bob@example.org", "not an address"),
        ("allow", "bob@example.org"),
        ("threshold", "bob@example.org", "lots"),
        ("threshold", "bob@example.org", "nan"),
    ):
        bad = mailctl(data, "spam", *args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert bad.stderr.startswith("mailctl spam: "), bad.stderr
    assert "write *.example.com" in mailctl(data, "spam", "block", bob, ".example.com").stderr
    nobody = mailctl(data, "spam", "show", "nobody@example.org")
    assert nobody.returncode == 1 and "Traceback" not in nobody.stderr
    assert run_with_storage(data, policy_of) == expected

    out = ok(mailctl(data, "spam", "remove", "bob@example.org", "corp.example", "nope.example"))
    assert "corp.example: removed from the block list" in out and "nope.example: on no list" in out
    ok(mailctl(data, "spam", "threshold", "bob@example.org", "none"))
    shown_json = json.loads(ok(mailctl(data, "spam", "show", "bob@example.org", "--json")))
    assert shown_json == {
        "allow": ["boss@corp.example"],
        "block": ["*.partner.example", "xn--bcher-kva.example"],
        "junk_threshold": None,
    }
