"""The Prometheus scrape endpoint of one process, apart from every public port.

Contract: :func:`start_metrics` listens on each ``server.metrics_listen``
address (default ``127.0.0.1:9480``, loopback only; empty: none) and answers
``GET /metrics`` with :data:`runtime.metrics.REGISTRY` in the text format,
any other path with 404 and any other method with 405; one request per
connection. Every daemon process runs it, with or without httpapi. A
worker of a ``server.processes`` supervisor listens on the port plus its
slot number (9480, 9481 ...), so each worker's numbers are scraped apart.
A port that cannot be bound is logged as an error and skipped: monitoring
never stops mail service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from conf.settings import Settings
from runtime.listen import ListenError, open_listener
from runtime.metrics import CONTENT_TYPE, REGISTRY

log = logging.getLogger("shardmail.metrics")

REQUEST_TIMEOUT = 10.0  # seconds a scraper gets to send its request head
MAX_HEAD = 8192  # octets of request line and headers; more is refused


def _response(status: str, body: bytes, content_type: str, extra: str = "") -> bytes:
    # RFC 9112 section 9.6: "Connection: close", one exchange per connection.
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def answer(head: bytes) -> bytes:
    """The whole response to one request head (request line and headers)."""
    method, _, rest = head.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if path != b"/metrics":
        return _response("404 Not Found", b"not found\n", "text/plain")
    if method not in (b"GET", b"HEAD"):
        # RFC 9110 section 15.5.6: a 405 names the allowed methods.
        return _response("405 Method Not Allowed", b"", "text/plain", "Allow: GET, HEAD\r\n")
    body = REGISTRY.render().encode("utf-8")
    response = _response("200 OK", body, CONTENT_TYPE)
    return response[: len(response) - len(body)] if method == b"HEAD" else response


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
        writer.close()
        return
    with contextlib.suppress(OSError):
        writer.write(answer(head))
        await writer.drain()
    writer.close()


def _with_slot(address: str, slot: int) -> str:
    host, _, port = address.rpartition(":")
    return address if port == "0" else f"{host}:{int(port) + slot}"


async def start_metrics(settings: Settings, slot: int = 0) -> list[asyncio.Server]:
    """Listen on every ``server.metrics_listen`` address (port + ``slot``);
    the caller closes the returned servers."""
    servers = []
    for configured in settings.server.metrics_listen:
        address = _with_slot(configured, slot)
        try:
            sock = open_listener("server.metrics_listen", address)
        except ListenError as exc:
            log.error("%s; no metrics there", exc)
            continue
        servers.append(await asyncio.start_server(_serve, sock=sock, limit=MAX_HEAD))
        log.info("metrics listening on http://%s/metrics", address)
    return servers
