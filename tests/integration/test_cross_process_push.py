"""Instant push across processes on SQLite: mtad and imapd run as separate
processes over one data dir (as the systemd units do); a message delivered
by mtad reaches an IDLE session in imapd through the local socket event bus,
well before imapd's own storage poll (FORCED_POLL_INTERVAL, 2 s) would.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher, profiles

from conf.settings import Settings
from conf.tls import server_context
from storage import open_storage
from tests.conftest import loopback_dns, make_settings, storage_url
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "example.net"
ALICE = f"alice@{DOMAIN}"
ALICE_PW = "alice-secret"
# Well under imapd's 2 s forced poll: only the bus gets the news there in time.
PUSH_DEADLINE = 0.5
START_TIMEOUT = 30.0



def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def write_config(
    path: Path, data_dir: Path, ports: dict[str, int], **more: dict[str, object]
) -> None:
    """A config for daemons on ``ports`` ("mx", "imap") over ``data_dir``;
    ``more`` adds keys, section by section."""
    any_port = ["127.0.0.1:0"]  # listeners the test does not use
    sections: dict[str, dict[str, object]] = {
        "server": {"hostname": "mail.test", "data_dir": str(data_dir), "log_level": "WARNING"},
        "auth": {"allow_plaintext": True},
        "smtp": {
            "mx_listen": [f"127.0.0.1:{ports['mx']}"],
            "submission_listen": any_port,
            "submissions_listen": any_port,
            "spf": False,
            "dkim_verify": False,
        },
        "imap": {"listen": [f"127.0.0.1:{ports['imap']}"], "tls_listen": any_port},
        "pop3": {"listen": any_port, "tls_listen": any_port},
        "http": {"listen": any_port},
        "queue": {"workers": 0},
        "dns": loopback_dns(),
    }
    url = storage_url(data_dir)  # SHARDMAIL_TEST_BACKEND=postgresql: the site's database
    if url is not None:
        sections["storage"] = {"url": url}
    for name, values in more.items():
        sections.setdefault(name, {}).update(values)
    write_toml(path, sections)


def write_toml(path: Path, sections: dict[str, dict[str, object]]) -> None:
    """A config file of ``sections`` (section -> key -> value)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


async def start_daemon(name: str, config: Path, port: int) -> asyncio.subprocess.Process:
    log_path = config.parent / f"{name}.log"
    log = log_path.open("ab")  # a file: a full pipe would stall the daemon
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", name, "-c", str(config),
        cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=log,
    )
    log.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while loop.time() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"{name} exited: {log_path.read_text(errors='replace')}")
        if "shardmail ready" in log_path.read_text(errors="replace"):
            return proc
        await asyncio.sleep(0.05)
    await stop(proc)
    raise AssertionError(f"{name} did not start: {log_path.read_text(errors='replace')}")


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def prepare_site(tmp_path: Path) -> tuple[Settings, Path, dict[str, int]]:
    """A data dir under ``tmp_path`` with ALICE's account, its certificate
    and a config file for the daemons: (settings, config path, ports)."""
    data_dir = tmp_path / "data"
    settings = make_settings(data_dir)
    data_dir.mkdir()
    # The cheapest argon2 profile: LOGIN verifies against the stored parameters.
    hasher = PasswordHasher.from_parameters(profiles.CHEAPEST)
    store = await open_storage(settings.storage, password_hasher=hasher)
    try:
        await store.directory.add_domain(DOMAIN)
        await store.directory.add_account(ALICE, ALICE_PW)
    finally:
        await store.close()
    # The self-signed certificate, made once here rather than raced by two daemons.
    await asyncio.to_thread(server_context, settings)
    ports = {"mx": free_port(), "imap": free_port()}
    config = tmp_path / "shardmail.toml"
    write_config(config, data_dir, ports)
    return settings, config, ports


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[dict[str, int]]:
    """mtad and imapd as two processes over one SQLite data dir."""
    _, config, ports = await prepare_site(tmp_path)
    procs = await asyncio.gather(
        start_daemon("imapd", config, ports["imap"]),
        start_daemon("mtad", config, ports["mx"]),
        return_exceptions=True,
    )
    started = [p for p in procs if isinstance(p, asyncio.subprocess.Process)]
    try:
        for p in procs:
            if isinstance(p, BaseException):
                raise p
        yield ports
    finally:
        await asyncio.gather(*(stop(p) for p in started))
    for p in started:
        assert p.returncode == 0, f"daemon exited with {p.returncode}"


class Lines:
    """CRLF lines from a stream, with a deadline per read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()

    async def line(self, timeout: float = 10.0) -> str:
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        if not raw:
            raise AssertionError("connection closed")
        return raw.decode(errors="replace").rstrip("\r\n")

    async def until(self, prefix: str, timeout: float = 10.0) -> list[str]:
        """Lines up to and including the first one starting with ``prefix``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = []
        while True:
            seen.append(await self.line(max(0.0, deadline - loop.time())))
            if seen[-1].startswith(prefix):
                return seen


async def smtp_reply(smtp: Lines) -> str:
    """The last line of a (multi-line, RFC 5321 section 4.2.1) reply."""
    while True:
        line = await smtp.line()
        if line[3:4] != "-":
            return line


async def smtp_deliver(port: int, body: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    smtp = Lines(reader, writer)
    try:
        await smtp.until("220 ")
        for command, reply in (
            ("EHLO client.example", "250 "),
            ("MAIL FROM:<someone@sender.example>", "250 "),
            (f"RCPT TO:<{ALICE}>", "250 "),
            ("DATA", "354 "),
        ):
            await smtp.send(command)
            assert (await smtp_reply(smtp)).startswith(reply), command
        writer.write(body.encode() + b".\r\n")
        # RFC 5321 section 4.2.5: the 250 after DATA means the message is ours.
        assert (await smtp_reply(smtp)).startswith("250 ")
        await smtp.send("QUIT")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_delivery_by_mtad_reaches_idle_in_imapd(daemons: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemons["imap"])
    imap = Lines(reader, writer)
    try:
        assert (await imap.line()).startswith("* OK")
        await imap.send(f'a1 LOGIN {ALICE} "{ALICE_PW}"')
        assert (await imap.until("a1 "))[-1].startswith("a1 OK")
        await imap.send("a2 SELECT INBOX")
        selected = await imap.until("a2 ")
        assert selected[-1].startswith("a2 OK") and "* 0 EXISTS" in selected
        await imap.send("a3 IDLE")  # RFC 2177
        assert (await imap.line()).startswith("+")

        body = (
            f"From: someone@sender.example\r\nTo: {ALICE}\r\nSubject: Push\r\n"
            "Message-ID: <push@sender.example>\r\n\r\nInstant.\r\n"
        )
        await smtp_deliver(daemons["mx"], body)
        loop = asyncio.get_running_loop()
        delivered = loop.time()
        pushed = await imap.until("* 1 EXISTS", timeout=PUSH_DEADLINE)
        assert loop.time() - delivered < PUSH_DEADLINE, pushed

        await imap.send("DONE")
        assert (await imap.until("a3 "))[-1].startswith("a3 OK")
        await imap.send("a4 LOGOUT")
        await imap.until("a4 ")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
