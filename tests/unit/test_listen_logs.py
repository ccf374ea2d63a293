"""What an operator reads at INFO: each listener once at start (with the port
it really bound), one line per delivered message; never a line per SMTP
command, never "connection lost" for a client that said QUIT or LOGOUT,
never aiosmtpd's mechanism table."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import poplib
import smtplib
import ssl
from dataclasses import dataclass

import pytest

from conf.settings import Settings

USER, PASSWORD = "carol@example.org", "secret"


def polite_clients(smtp_port: int, submission_port: int, imap_port: int, pop3_port: int) -> None:
    """One ordinary session per protocol, each ended with QUIT or LOGOUT."""
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
        smtp.sendmail("a@remote.example", [USER], b"Subject: m\r\n\r\nhello\r\n")
    with smtplib.SMTP("127.0.0.1", submission_port, timeout=30) as smtp:
        smtp.ehlo()
    imap = imaplib.IMAP4("127.0.0.1", imap_port)
    imap.login(USER, PASSWORD)
    imap.logout()
    pop = poplib.POP3("127.0.0.1", pop3_port, timeout=30)
    pop.user(USER)
    pop.pass_(PASSWORD)
    pop.quit()


@dataclass
class Logged:
    lines: list[str]  # INFO and above, in order
    ports: dict[str, int]  # listener setting -> bound port


@pytest.fixture
async def logged(
    settings: Settings, storage, tls_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> Logged:
    import imapd.service
    import mtad.service

    caplog.set_level(logging.INFO)
    settings.smtp.spf = False
    settings.auth.allow_plaintext = True  # plain loopback logins
    await storage.directory.add_domain("example.org")
    await storage.directory.add_account(USER, PASSWORD)
    mta = await mtad.service.start(settings, storage, tls_context)
    access = await imapd.service.start(settings, storage, tls_context)
    try:
        ports = {
            "smtp.mx_listen": mta.port("mx"),
            "smtp.submission_listen": mta.port("submission"),
            "imap.listen": access.imap[0].sockets[0].getsockname()[1],
            "pop3.listen": access.pop3[0].sockets[0].getsockname()[1],
        }
        await asyncio.to_thread(polite_clients, *ports.values())
        await asyncio.sleep(0.2)  # the servers see the last connections end
    finally:
        await access.close()
        await mta.close()
    return Logged([r.getMessage() for r in caplog.records if r.levelno >= logging.INFO], ports)


async def test_no_line_per_smtp_command_and_no_connection_lost(logged: Logged) -> None:
    text = "\n".join(logged.lines)
    assert ">>" not in text and "ehlo" not in text.lower() and "QUIT" not in text
    assert "connection lost" not in text.lower()
    assert "(builtin)" not in text and "offered" not in text
    deliveries = [line for line in logged.lines if "from=<a@remote.example>" in line]
    assert len(deliveries) == 1  # the one line an operator wants per message


async def test_every_listener_is_logged_once_with_its_bound_port(logged: Logged) -> None:
    for setting, port in logged.ports.items():
        lines = [line for line in logged.lines if "listening on" in line and f":{port} " in line]
        assert len(lines) == 1 and setting in lines[0], (setting, logged.lines)
    assert sum("listening on" in line for line in logged.lines) == 7  # 3 SMTP, 2 IMAP, 2 POP3
