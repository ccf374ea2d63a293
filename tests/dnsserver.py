"""A throwaway authoritative DNS server for tests: dnsmasq on 127.0.0.1.

Usage::

    zone = Zone()
    zone.a("mx.example.com", "127.0.0.1")
    zone.mx("example.com", "mx.example.com", 10)
    zone.null_mx("nomail.example")                # RFC 7505 "0 ."
    zone.txt("example.com", "v=spf1 ip4:127.0.0.1 -all")
    with dns_server(zone) as dns:                  # also: async with
        settings.dns -> nameservers=[dns.host], port=dns.port

Every name not in the zone answers NXDOMAIN (``--local=/#/``: no upstream,
no /etc/hosts), so lookups are hermetic. The server is up and answering
when the context manager yields, and killed (by its own pid) on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from tests.ports import free_port as _free_port

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
# One TXT character-string holds at most 255 octets (RFC 1035 section 3.3).
TXT_CHUNK = 255


@dataclass
class Zone:
    """Records to serve; call the methods, or pass them to the constructor."""

    options: list[str] = field(default_factory=list)

    def a(self, name: str, *addresses: str) -> Zone:
        for address in addresses:
            self.options.append(f"--host-record={name},{address}")
        return self

    def aaaa(self, name: str, *addresses: str) -> Zone:
        return self.a(name, *addresses)  # dnsmasq tells v4 from v6 itself

    def mx(self, domain: str, exchange: str, preference: int = 10) -> Zone:
        self.options.append(f"--mx-host={domain},{exchange},{preference}")
        return self

    def null_mx(self, domain: str) -> Zone:
        """RFC 7505: ``MX 0 .`` -- the domain accepts no mail."""
        return self.mx(domain, ".", 0)

    def txt(self, name: str, text: str) -> Zone:
        """One TXT record; text longer than 255 octets is split into strings."""
        chunks = [text[i : i + TXT_CHUNK] for i in range(0, len(text), TXT_CHUNK)] or [""]
        for chunk in chunks:
            if "," in chunk or '"' in chunk:
                raise ValueError("dnsmasq TXT text cannot hold commas or quotes")
        quoted = ",".join(chunks)
        self.options.append(f"--txt-record={name},{quoted}")
        return self

    def forward(self, domain: str, port: int, host: str = "127.0.0.1") -> Zone:
        """Names under ``domain`` are asked of the server at ``host``:``port``
        (a zone whose server is down or never answers)."""
        self.options.append(f"--server=/{domain}/{host}#{port}")
        return self


@dataclass
class DnsServer:
    host: str
    port: int
    process: subprocess.Popen

    @property
    def nameservers(self) -> list[str]:
        return [self.host]

    def settings(self, timeout: float = 2.0) -> dict[str, object]:
        """The ``[dns]`` settings section pointing at this server."""
        return {"nameservers": [self.host], "port": self.port, "timeout_seconds": timeout}



def _answers(port: int) -> bool:
    import dns.message
    import dns.query

    query = dns.message.make_query("ready.invalid.", "A")
    try:
        dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
    except Exception:
        return False
    return True


def start_dns_server(zone: Zone, timeout: float = 10.0) -> DnsServer:
    """Start dnsmasq with ``zone``; the caller must :func:`stop_dns_server` it."""
    for _attempt in range(3):  # the free port can be taken in between: retry
        port = _free_port()
        argv = [
            DNSMASQ,
            "--no-daemon",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            f"--port={port}",
            "--bind-interfaces",
            "--local=/#/",  # answer only from our records: NXDOMAIN otherwise
            "--cache-size=0",
            "--log-facility=-",
            "--pid-file=",
            *zone.options,
        ]
        if os.geteuid() == 0:
            argv.append("--user=root")
        process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _answers(port):
                return DnsServer("127.0.0.1", port, process)
            time.sleep(0.02)
        error = b""
        if process.poll() is None:
            process.kill()
        else:
            error = process.stderr.read() if process.stderr else b""
        process.wait()
        if b"Address already in use" not in error and error:
            raise RuntimeError(f"dnsmasq failed: {error.decode(errors='replace')}")
    raise RuntimeError("dnsmasq did not start")


def stop_dns_server(server: DnsServer) -> None:
    if server.process.poll() is None:
        server.process.kill()
    server.process.wait()
    if server.process.stderr:
        server.process.stderr.close()


class dns_server(contextlib.AbstractContextManager, contextlib.AbstractAsyncContextManager):
    """``with dns_server(zone) as dns`` or ``async with dns_server(zone) as dns``."""

    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.server: DnsServer | None = None

    def __enter__(self) -> DnsServer:
        self.server = start_dns_server(self.zone)
        return self.server

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            stop_dns_server(self.server)

    async def __aenter__(self) -> DnsServer:
        import asyncio

        self.server = await asyncio.to_thread(start_dns_server, self.zone)
        return self.server

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            stop_dns_server(self.server)


__all__ = ["DnsServer", "Zone", "dns_server", "start_dns_server", "stop_dns_server"]

