"""An HTTPS server for MTA-STS policies (RFC 8461 section 3.3) on 127.0.0.1.

``PolicyServer(context, routes)``: ``routes`` maps a Host header
(``mta-sts.<domain>``) to the raw HTTP response bytes to send, or to an
async callable ``(writer) -> None`` that writes what it likes (hostile
peers: endless bodies, slow drips). Unknown hosts get 404. ``requests``
lists the Host of every request served, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable

Route = bytes | Callable[[asyncio.StreamWriter], Awaitable[None]]


def policy_response(body: str | bytes, content_type: str = "text/plain") -> bytes:
    data = body.encode() if isinstance(body, str) else body
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


class PolicyServer:
    def __init__(self, context: ssl.SSLContext, routes: dict[str, Route]) -> None:
        self.context = context
        self.routes = routes
        self.requests: list[str] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> PolicyServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host = ""
            while line := (await reader.readline()).decode("latin-1").rstrip("\r\n"):
                name, _, value = line.partition(":")
                if name.lower() == "host":
                    host = value.strip()
            self.requests.append(host)
            route = self.routes.get(host, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            if isinstance(route, bytes):
                writer.write(route)
                await writer.drain()
            else:
                await route(writer)
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
