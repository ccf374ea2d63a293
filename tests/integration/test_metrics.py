"""/metrics, served on server.metrics_listen apart from the public API
port, counts what every daemon of the process does (mailctl serve runs them
on one loop): SMTP receipt and local delivery, IMAP, POP3 connections and
failed logins."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import re
import smtplib
import urllib.error
import urllib.request

import pytest

from conf.settings import Settings


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(shardmail_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def client_session(ports: dict[str, int]) -> None:
    with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=30) as smtp:
        smtp.sendmail("a@remote.example", ["carol@example.org"], b"Subject: m\r\n\r\nhello\r\n")
    imap = imaplib.IMAP4("127.0.0.1", ports["imap"])
    try:
        imap.login("carol@example.org", "wrong")
    except imaplib.IMAP4.error:
        pass
    imap.logout()
    pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=30)
    pop.quit()


async def test_metrics_count_every_protocol(settings: Settings, storage, tls_context) -> None:
    import httpapi.service
    import imapd.service
    import mtad.service
    from runtime.scrape import start_metrics

    settings.auth.allow_plaintext = True  # plain loopback logins, to count the failure
    settings.smtp.spf = False
    settings.smtp.dkim_verify = False
    await storage.directory.add_domain("example.org")
    await storage.directory.add_account("carol@example.org", "secret")
    mta = await mtad.service.start(settings, storage, tls_context)
    access = await imapd.service.start(settings, storage, tls_context)
    http = await httpapi.service.start(settings, storage, tls_context)
    settings.server.metrics_listen = ["127.0.0.1:0"]
    (metrics,) = await start_metrics(settings)
    metrics_port = metrics.sockets[0].getsockname()[1]
    try:
        imap_port = access.imap[0].sockets[0].getsockname()[1]
        pop3_port = access.pop3[0].sockets[0].getsockname()[1]
        ports = {"mx": mta.port("mx"), "imap": imap_port, "pop3": pop3_port}
        before = await asyncio.to_thread(scrape, metrics_port)
        await asyncio.to_thread(client_session, ports)
        after = await asyncio.to_thread(scrape, metrics_port)
        # Not on the public API port.
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(scrape, http.ports[0])
        assert refused.value.code == 404
    finally:
        metrics.close()
        await http.close()
        await access.close()
        await mta.close()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('shardmail_messages_received_total{protocol="smtp"}') == 1
    assert delta('shardmail_messages_delivered_total{destination="local"}') == 1
    assert delta('shardmail_connections_total{protocol="smtp"}') == 1
    assert delta('shardmail_connections_total{protocol="imap"}') == 1
    assert delta('shardmail_connections_total{protocol="pop3"}') == 1
    assert delta('shardmail_auth_failures_total{protocol="imap"}') == 1
