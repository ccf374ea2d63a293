"""Issue #18's connection floods: one address opening connections faster than
its protocol's ``connect_rate_per_ip`` (implicit TLS, where each connection
costs the server a handshake), or more at once than ``max_connections_per_ip``,
or never logging in. The attacker is 127.0.0.1; other clients, on 127.0.0.9,
are served as before (see conftest's probe)."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conf.settings import Settings
from tests.hostile.conftest import (
    MAX_PROBE_DELAY,
    PROBE_ADDR,
    Site,
    _from_probe_addr,
    probing,
    running_site,
)

# What the site runs with (the shipped defaults, loopback not exempt).
BURST = Settings().imap.connect_burst_per_ip
RATE = Settings().imap.connect_rate_per_ip
TLS_PORTS = ("imaps", "pop3s", "submissions")
GREETINGS = {"imaps": b"* OK", "pop3s": b"+OK", "submissions": b"220 "}
FLOOD_SECONDS = 4.0
FLOOD_THREADS = 16


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # self-signed
    return context


def _tls_connect_flood(ports: dict[str, int], seconds: float, threads: int) -> dict[str, Counter]:
    """New TLS connections from the attacker's address to every implicit-TLS
    port, as fast as ``threads`` threads can open them, for ``seconds``; per
    port, how many completed a handshake and how many were closed before one."""
    # The attacker stands for another machine: its client CPU yields to the
    # server on the cores they share here.
    os.nice(19)
    context = _client_context()
    outcomes = {name: Counter() for name in TLS_PORTS}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def flood(offset: int) -> None:
        turn = offset
        while time.monotonic() < end:
            name = TLS_PORTS[turn % len(TLS_PORTS)]
            turn += 1
            try:
                with socket.create_connection(("127.0.0.1", ports[name]), timeout=30) as raw:
                    with context.wrap_socket(raw):
                        outcome = "handshake"
            except (ssl.SSLError, OSError):
                outcome = "cut"  # closed before the server said a word
            with lock:
                outcomes[name][outcome] += 1

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(flood, range(threads)))
    return outcomes


def _tls_greeting_seconds(port: int, greeting: bytes) -> float:
    """A new client on the probe's address: connect, TLS handshake and
    greeting (RFC 8314 section 3.3: implicit TLS), timed."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30,
                                  source_address=(PROBE_ADDR, 0)) as raw:
        with _client_context().wrap_socket(raw) as tls:
            line = tls.makefile("rb").readline()
    took = time.monotonic() - start
    assert line.startswith(greeting), line
    return took


def test_a_tls_connect_flood_is_cut_before_the_handshake(site: Site) -> None:
    """One address opening TLS connections without end costs the server one
    handshake per connection: past its burst, connections are closed before
    any handshake, and other clients' TLS greetings and NOOPs come in time."""
    worst: dict[str, float] = {}
    with probing(site), concurrent.futures.ProcessPoolExecutor(1) as attacker:
        started = time.monotonic()
        flood = attacker.submit(_tls_connect_flood, site.ports, FLOOD_SECONDS, FLOOD_THREADS)
        while not flood.done():
            for name in TLS_PORTS:
                took = _tls_greeting_seconds(site.ports[name], GREETINGS[name])
                worst[name] = max(worst.get(name, 0.0), took)
            time.sleep(0.25)  # well under the probe address's own rate
        outcomes = flood.result()
        elapsed = time.monotonic() - started
    for name, counts in outcomes.items():
        # The flood went past the limit, and the server did no more
        # handshakes than the limit lets through (plus one second's worth
        # for the processes' start).
        assert counts["cut"] > 0, (name, counts)
        assert counts["handshake"] <= BURST + RATE * (elapsed + 1), (name, counts, elapsed)
    assert worst and max(worst.values()) <= MAX_PROBE_DELAY, worst


LIMIT = 3  # the test site's max_connections_per_ip on every protocol
PREAUTH = 1.5  # and its pre-authentication timeout, seconds
# What the (LIMIT+1)th connection from one address reads, and what a held,
# never-authenticated IMAP/POP3 connection reads when its timer ends.
REFUSALS = {
    "imap": b"* BYE [UNAVAILABLE]",  # RFC 3501 section 7.1.5, RFC 5530 section 3
    "pop3": b"-ERR [SYS/TEMP]",  # RFC 3206 section 4
    "http": b"HTTP/1.1 503",  # RFC 9110 section 15.6.4
}
AUTOLOGOUT = {"imap": b"* BYE Autologout", "pop3": b"-ERR autologout"}  # RFC 3501 section 5.4
PLAIN_GREETINGS = {"imap": b"* OK", "pop3": b"+OK"}


@pytest.fixture
def limited_site(tmp_path: Path) -> Iterator[Site]:
    """The site with a small per-address limit and pre-authentication timer."""
    limits = {"max_connections_per_ip": LIMIT}
    with running_site(
        tmp_path,
        imap={**limits, "preauth_timeout_seconds": PREAUTH},
        pop3={**limits, "preauth_timeout_seconds": PREAUTH},
        http=limits,
    ) as running:
        yield running


def _held(port: int, greeting: bytes | None) -> socket.socket:
    """A connection from the attacker's address, its greeting read (HTTP
    has none: the connection is held without a request)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    if greeting is not None:
        line = sock.makefile("rb").readline()
        assert line.startswith(greeting), line
    return sock


def _all_it_says(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(30)
    with sock:
        return sock.makefile("rb").read()


def test_one_address_over_its_connection_limit_is_refused_and_others_are_not(
    limited_site: Site,
) -> None:
    """IMAP, POP3 and HTTP took any number of connections from one address,
    and kept an IMAP connection that never logged in for 1,800 s."""
    site = limited_site
    with probing(site):
        held = {
            name: [_held(site.ports[name], PLAIN_GREETINGS.get(name)) for _ in range(LIMIT)]
            for name in REFUSALS
        }
        for name, refusal in REFUSALS.items():
            extra = socket.create_connection(("127.0.0.1", site.ports[name]), timeout=30)
            if name == "http":
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            said = _all_it_says(extra)
            assert said.startswith(refusal), (name, said)
            if name in PLAIN_GREETINGS:  # another address is let in meanwhile
                with _from_probe_addr(site.ports[name]) as other:
                    line = other.makefile("rb").readline()
                    assert line.startswith(PLAIN_GREETINGS[name]), (name, line)
        # Never authenticated: dropped with the protocol's goodbye once the
        # short pre-authentication timer runs out, and the slots come back.
        for name, goodbye in AUTOLOGOUT.items():
            for sock in held[name]:
                said = _all_it_says(sock)
                assert said.startswith(goodbye), (name, said)
            again = _held(site.ports[name], PLAIN_GREETINGS[name])
            again.close()
    for sock in held["http"]:
        sock.close()
