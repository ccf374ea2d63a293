"""IMAP command rates: FETCH (headers, full bodies), STORE, SEARCH, APPEND and
a mixed load over concurrent kept sessions, against shardmail's imapd and
(with ``--compare-dovecot``) Dovecot on the same machine in the same run.

Setup. A fresh data directory with ``--clients`` accounts (``--layout
accounts``, the default: one account per session) or one account shared by
every session (``--layout shared``), each INBOX pre-filled with
``--messages`` messages of ``--size`` octets (all unseen) through
``storage.ingest``. shardmail's imapd runs in its own process (``python -m
imapd`` with ``-o`` overrides: loopback plaintext IMAP on a free port,
``auth.allow_plaintext=true``); Dovecot (``bench/dovecot_peer.py``) gets the
very same message bytes in Maildirs.

Client. One asyncio process; each session logs in, SELECTs INBOX, then runs
one command at a time (no pipelining), picked at random from the phase's
mix, for ``--seconds``. Phases, in order:

=============  ==========================================================
fetch_header   ``UID FETCH <random uid> (BODY.PEEK[HEADER])``
fetch_body     ``UID FETCH <random uid> (BODY.PEEK[])``
fetch_struct   ``UID FETCH <random uid> (FLAGS RFC822.SIZE ENVELOPE
               BODYSTRUCTURE)`` (needs the parsed form from storage)
store          ``UID STORE <random uid> +FLAGS (\\Seen)`` or ``-FLAGS``
               (every STORE changes the flag: the session tracks which of
               its messages are seen; random +/- with ``--layout shared``)
search         ``UID SEARCH UNSEEN``
noop           ``NOOP``
mixed          40% fetch_header, 20% fetch_body, 20% store,
               10% search, 10% noop
append         ``APPEND INBOX {N+}`` (LITERAL+, RFC 7888) of one message
select         ``SELECT INBOX`` again (the snapshot of the whole mailbox)
churn          ``--churn-clients`` sessions on one account's INBOX of
               ``--churn-messages``: LIST, STATUS, FETCH of envelopes and
               of whole bodies, STORE of flags and keywords, STORE
               \\Deleted + EXPUNGE, APPEND while a view holds fewer than
               ``--churn-floor`` messages (``bench/imap_churn.py``); then
               its checker compares every session's view with storage
login          connect, ``LOGIN``, ``LOGOUT``, again, per ``--clients``
               client, each on its own account and loopback address
               (run apart from the others: :func:`run_logins`; the
               servers are shardmail with and without its authentication
               cache, and one Dovecot per ``--dovecot-schemes``)
conn_memory    not a command rate: ``--conn-count`` more connections,
               plaintext and then implicit TLS, each logged in with INBOX
               selected (``--conn-batch`` logins in progress at a time),
               then left idle; the server's PSS (all of its processes)
               before and after, per connection (issue #24)
=============  ==========================================================

Every phase also samples the server's memory (PSS and RSS summed over
its processes, every 0.25 s) and reports the peak; shardmail's VmHWM
(peak since start) is printed beside it.

Reported per phase: commands/s, latency p50/p99, server CPU ms per
command (utime+stime from /proc/PID/stat; for Dovecot summed over all of
its processes), client CPU ms per command, and how busy the whole machine
was (others' load skews figures on a shared machine). Never part of the
test run::

    python -m bench.imap_bench --compare-dovecot
    python -m bench.imap_bench --compare-dovecot --rounds 5 --phases store,mixed
    python -m bench.imap_bench --phases login --clients 10 --seconds 20 --rounds 4 \
        --compare-dovecot

With ``--rounds N`` both servers run at once and each phase runs on one
right after the other, N times, the order swapped each round; each round
gives a ratio, printed with their median. On a shared machine whose load
drifts by tens of percent, that pairing is what makes a comparison stand.
    python -m bench.imap_bench --phases mixed --seconds 20 --profile mixed
    python -m bench.imap_bench --backend sqlite,postgresql --phases fetch_header,store,append

``--backend sqlite,postgresql`` runs the phases on shardmail over each
storage in turn (PostgreSQL: a durable server the bench starts, see
``bench/storage_backend.py``, or ``--storage-url``) and prints each
backend's rates against the first's; ``--rounds`` pairs use the first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.dovecot_peer import (
    DovecotPeer,
    free_port,
    peak_rss_kib,
    proc_cpu_seconds,
    proc_memory_kib,
    process_tree,
)
from bench.imap_churn import CHURN_MIX, ChurnSession, Tally, churn_message, open_churn, verify
from bench.storage_backend import (
    BenchStorage,
    add_storage_options,
    bench_storage,
    check_backends,
)
from runtime.daemon import add_override_option

if TYPE_CHECKING:
    from storage.model import Account

PASSWORD = "benchpass"
DOMAIN = "example.org"

MIXES: dict[str, dict[str, int]] = {
    "fetch_header": {"fetch_header": 1},
    "fetch_body": {"fetch_body": 1},
    "fetch_struct": {"fetch_struct": 1},
    "store": {"store": 1},
    "search": {"search": 1},
    "noop": {"noop": 1},
    "mixed": {"fetch_header": 40, "fetch_body": 20, "store": 20, "search": 10, "noop": 10},
    "append": {"append": 1},
    "select": {"select": 1},
    "churn": CHURN_MIX,
    "login": {"login": 1},
    "conn_memory": {},  # no commands: see conn_memory_phase
}
DEFAULT_PHASES = (
    "fetch_header", "fetch_body", "fetch_struct", "store", "search", "noop", "mixed", "append",
    "churn",
)
CHURN_LOGIN = f"churn@{DOMAIN}"  # the churn phase's own account, shared by its sessions


# ------------------------------------------------------------------ messages
_WORDS = (
    "mailbox quota relay envelope header parser queue shard replica session "
    "literal sequence flag modseq delivery bounce digest archive folder"
).split()


def message(i: int, size: int) -> bytes:
    """A plausible text/plain message of exactly ``size`` octets (about
    900 octets of header, trace and DKIM lines included)."""
    rng = random.Random(i)
    header = (
        f"Return-Path: <sender{i % 97}@example.net>\r\n"
        f"Received: from mx{i % 7}.example.net (mx{i % 7}.example.net [192.0.2.{i % 250}])\r\n"
        f"\tby mail.example.org with ESMTPS id {i:08x};"
        f" Tue, 4 Mar 2025 10:{i % 60:02d}:00 +0000\r\n"
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.net; s=s1;\r\n"
        "\th=from:to:subject:date:message-id; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
        "\tb=dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZSwganVzdCBiZW5jaCBwYWRkaW5nIGJ5dGVz\r\n"
        f"From: Sender {i % 97} <sender{i % 97}@example.net>\r\n"
        f"To: User <user@{DOMAIN}>\r\n"
        f"Subject: Bench message {i}: {' '.join(rng.choice(_WORDS) for _ in range(5))}\r\n"
        f"Date: Tue, 4 Mar 2025 10:{i % 60:02d}:00 +0000\r\n"
        f"Message-ID: <{i}.bench@example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    ).encode()
    lines = []
    total = len(header)
    while total < size:
        line = (" ".join(rng.choice(_WORDS) for _ in range(11)) + "\r\n").encode()
        lines.append(line)
        total += len(line)
    body = b"".join(lines)[: size - len(header) - 2] + b"\r\n"
    return header + body


# ------------------------------------------------------------------- client
class ImapClient(asyncio.Protocol):
    """A minimal IMAP client for load: one command at a time, responses
    scanned for the tagged completion with literals skipped ({n} counts)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pos = 0  # start of the next unscanned response segment
        self.cont = False  # pos is inside a line (after a literal)
        self.tagsp = b"* "  # the greeting ends the first "command"
        self.keep = False
        self.fut: asyncio.Future[tuple[bytes, bytes]] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.n = 0

    @classmethod
    async def connect(
        cls, port: int, source: str | None = None, tls: ssl.SSLContext | None = None
    ) -> ImapClient:
        """Connected, greeting read; from loopback address ``source`` if given,
        over TLS with ``tls``."""
        loop = asyncio.get_running_loop()
        local = (source, 0) if source else None
        _, client = await loop.create_connection(cls, "127.0.0.1", port, ssl=tls, local_addr=local)
        client.fut = loop.create_future()
        client._scan()
        status, _ = await client.fut
        if status != b"OK":
            raise RuntimeError(f"greeting: {status!r}")
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.fut is not None:
            self._scan()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError("server closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _scan(self) -> None:
        buf, pos, cont = self.buf, self.pos, self.cont
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if eol > pos and buf[eol - 1] == 0x7D:  # "}": a literal follows
                lb = buf.rfind(b"{", pos, eol)
                digits = bytes(buf[lb + 1 : eol - 1].rstrip(b"+")) if lb >= 0 else b""
                if digits.isdigit():
                    end = eol + 2 + int(digits)
                    if len(buf) < end:
                        break  # wait for the rest of the literal
                    pos, cont = end, True
                    continue
            if not cont and buf.startswith(self.tagsp, pos):
                rest = buf[pos + len(self.tagsp) : eol]
                status = bytes(rest.split(b" ", 1)[0])
                text = bytes(buf[: eol + 2]) if self.keep else b""
                del buf[: eol + 2]
                self.pos, self.cont = 0, False
                fut, self.fut = self.fut, None
                if fut is not None and not fut.done():
                    fut.set_result((status, text))
                return
            pos, cont = eol + 2, False
        self.pos, self.cont = pos, cont

    async def command(self, line: bytes, keep: bool = False) -> tuple[bytes, bytes]:
        """Send ``TAG line`` and wait for the tagged reply: (status, all
        response bytes if ``keep``)."""
        assert self.transport is not None
        self.n += 1
        tag = b"T%d" % self.n
        self.tagsp = tag + b" "
        self.keep = keep
        self.fut = asyncio.get_running_loop().create_future()
        self.transport.write(tag + b" " + line + b"\r\n")
        return await self.fut

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.command(b"LOGOUT"), 5)
            self.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.closed, 5)


class BenchSession:
    """One kept session: its account, its messages' UIDs and seen state."""

    def __init__(self, client: ImapClient, login: str, shared: bool, append_msg: bytes) -> None:
        self.client = client
        self.login = login
        self.shared = shared
        self.uids: list[int] = []
        self.seen: set[int] = set()
        self.rng = random.Random(login + str(id(self)))
        self.append_line = b"APPEND INBOX {%d+}\r\n" % len(append_msg) + append_msg

    async def open(self) -> None:
        for line in (b'LOGIN "%s" "%s"' % (self.login.encode(), PASSWORD.encode()),
                     b"SELECT INBOX"):
            status, text = await self.client.command(line, keep=True)
            if status != b"OK":
                raise RuntimeError(f"{self.login}: {line!r} -> {text[-300:]!r}")
        status, text = await self.client.command(b"UID SEARCH ALL", keep=True)
        for resp in text.split(b"\r\n"):
            if resp.startswith(b"* SEARCH"):
                self.uids = [int(u) for u in resp.split()[2:]]
        if not self.uids:
            raise RuntimeError(f"{self.login}: empty INBOX")
        status, text = await self.client.command(b"UID SEARCH SEEN", keep=True)
        for resp in text.split(b"\r\n"):
            if resp.startswith(b"* SEARCH"):
                self.seen = {int(u) for u in resp.split()[2:]}

    def line(self, kind: str) -> bytes:
        if kind == "fetch_header":
            return b"UID FETCH %d (BODY.PEEK[HEADER])" % self.rng.choice(self.uids)
        if kind == "fetch_body":
            return b"UID FETCH %d (BODY.PEEK[])" % self.rng.choice(self.uids)
        if kind == "fetch_struct":
            return b"UID FETCH %d (FLAGS RFC822.SIZE ENVELOPE BODYSTRUCTURE)" % self.rng.choice(
                self.uids
            )
        if kind == "store":
            uid = self.rng.choice(self.uids)
            if self.shared:
                add = self.rng.random() < 0.5
            else:
                add = uid not in self.seen
                (self.seen.add if add else self.seen.discard)(uid)
            return b"UID STORE %d %sFLAGS (\\Seen)" % (uid, b"+" if add else b"-")
        if kind == "search":
            return b"UID SEARCH UNSEEN"
        if kind == "noop":
            return b"NOOP"
        if kind == "append":
            return self.append_line
        if kind == "select":  # RFC 3501 6.3.1: SELECT again deselects, then selects
            return b"SELECT INBOX"
        raise ValueError(kind)

    async def close(self) -> None:
        await self.client.close()

    async def drive(self, mix: dict[str, int], deadline: float) -> dict[str, Tally]:
        kinds = list(mix)
        weights = [mix[k] for k in kinds]
        tallies = {k: Tally() for k in kinds}
        clock = time.perf_counter
        while clock() < deadline:
            kind = kinds[0] if len(kinds) == 1 else self.rng.choices(kinds, weights)[0]
            line = self.line(kind)
            t0 = clock()
            status, _ = await self.client.command(line)
            tally = tallies[kind]
            tally.latencies.append(clock() - t0)
            if status == b"OK":
                tally.ok += 1
            else:
                tally.failed += 1
        return tallies


class LoginSession:
    """One client of the login phase: connect, ``LOGIN``, ``LOGOUT``, close,
    over and over; each from a loopback address of its own, as distinct
    clients would be (servers bound checks per client address)."""

    def __init__(self, port: int, login: str, source: str) -> None:
        self.port = port
        self.login = login
        self.source = source

    async def once(self) -> bytes:
        """One login and logout: the LOGIN's status."""
        client = await ImapClient.connect(self.port, self.source)
        try:
            status, _ = await client.command(
                b'LOGIN "%s" "%s"' % (self.login.encode(), PASSWORD.encode())
            )
        finally:
            await client.close()  # LOGOUT, then the server closes (RFC 3501 6.1.3)
        return status

    async def drive(self, mix: dict[str, int], deadline: float) -> dict[str, Tally]:
        tally = Tally()
        clock = time.perf_counter
        while clock() < deadline:
            t0 = clock()
            try:
                status = await self.once()
            except (OSError, RuntimeError):
                status = b"closed"
            tally.latencies.append(clock() - t0)
            if status == b"OK":
                tally.ok += 1
            else:
                tally.failed += 1
        return {"login": tally}

    async def close(self) -> None:
        pass


# -------------------------------------------------------------- measurement
def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


@dataclass
class PhaseResult:
    server: str
    phase: str
    seconds: float
    commands: int
    failed: int
    per_second: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_cmd: float
    client_cpu_ms_per_cmd: float
    server_cpu_cores: float
    machine_busy_cores: float
    loadavg: float
    by_kind: dict[str, dict[str, float]]
    # The churn checker's findings by kind (bench/imap_churn.py); empty is right.
    checker: dict[str, int] = field(default_factory=dict)
    # The PostgreSQL server's CPU, when the bench started it (--backend postgresql).
    database_cpu_ms_per_cmd: float = 0.0
    # The server's memory during the phase: the highest of its samples (PSS
    # and RSS summed over its processes), and shardmail's VmHWM at the end
    # (its peak resident set since it started, so an earlier phase's too).
    peak_pss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    vmhwm_mib: float = 0.0


@dataclass
class MemoryResult:
    """The conn_memory phase on one transport: the server's memory before
    and after ``connections`` idle sessions were opened (KiB)."""

    server: str
    phase: str
    transport: str  # "plain" or "tls"
    connections: int
    pss_before_kib: int
    pss_after_kib: int
    rss_before_kib: int
    rss_after_kib: int
    pss_per_conn_kib: float
    rss_per_conn_kib: float
    open_seconds: float
    loadavg: float


class MemorySampler:
    """Samples the memory of the processes ``pids`` names every
    ``interval`` seconds while running: PSS and RSS summed over them
    (:func:`bench.dovecot_peer.proc_memory_kib`), keeping the highest."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        pss, rss = proc_memory_kib(self.pids())
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss = max(self.peak_rss, rss)

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self.sample()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_phase(
    server: str,
    phase: str,
    sessions: Sequence[BenchSession | ChurnSession | LoginSession],
    seconds: float,
    server_cpu: Callable[[], float],
    database_cpu: Callable[[], float] = lambda: 0.0,
    settle: Callable[[], Awaitable[None]] | None = None,
    pids: Callable[[], list[int]] | None = None,
    hwm_pids: Sequence[int] = (),
) -> PhaseResult:
    """One phase on kept ``sessions``; with ``pids`` (the server's
    processes) its memory is sampled throughout, and the VmHWM of
    ``hwm_pids`` (shardmail's) read at the end."""
    mix = MIXES[phase]
    sampler = MemorySampler(pids) if pids is not None else None
    if sampler is not None:
        sampler.start()
    cpu0, client0, (busy0, _) = server_cpu(), time.process_time(), machine_busy_seconds()
    db0 = database_cpu()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(s.drive(mix, t0 + seconds) for s in sessions))
    elapsed = time.perf_counter() - t0
    if sampler is not None:
        await sampler.stop()
    if settle is not None:
        await settle()  # the database's deferred work for this load counts as its own
    cpu1, client1, (busy1, _) = server_cpu(), time.process_time(), machine_busy_seconds()
    db1 = database_cpu()
    merged: dict[str, Tally] = {}
    for tallies in results:
        for kind, t in tallies.items():
            m = merged.setdefault(kind, Tally())
            m.ok += t.ok
            m.failed += t.failed
            m.latencies.extend(t.latencies)
    lat = [x for t in merged.values() for x in t.latencies]
    n = len(lat)
    by_kind = {
        kind: {
            "commands": len(t.latencies),
            "failed": t.failed,
            "p50_ms": round(_percentile(t.latencies, 0.5) * 1000, 2),
            "p99_ms": round(_percentile(t.latencies, 0.99) * 1000, 2),
            "mean_ms": round(statistics.fmean(t.latencies) * 1000, 2) if t.latencies else 0.0,
        }
        for kind, t in merged.items()
    }
    return PhaseResult(
        server=server,
        phase=phase,
        seconds=round(elapsed, 2),
        commands=n,
        failed=sum(t.failed for t in merged.values()),
        per_second=round(n / elapsed, 1),
        p50_ms=round(_percentile(lat, 0.5) * 1000, 2),
        p99_ms=round(_percentile(lat, 0.99) * 1000, 2),
        server_cpu_ms_per_cmd=round((cpu1 - cpu0) * 1000 / max(n, 1), 3),
        client_cpu_ms_per_cmd=round((client1 - client0) * 1000 / max(n, 1), 3),
        server_cpu_cores=round((cpu1 - cpu0) / elapsed, 2),
        machine_busy_cores=round((busy1 - busy0) / elapsed, 2),
        loadavg=round(os.getloadavg()[0], 2),
        by_kind=by_kind,
        database_cpu_ms_per_cmd=round((db1 - db0) * 1000 / max(n, 1), 3),
        peak_pss_mib=round(sampler.peak_pss / 1024, 1) if sampler else 0.0,
        peak_rss_mib=round(sampler.peak_rss / 1024, 1) if sampler else 0.0,
        vmhwm_mib=round(max((peak_rss_kib(p) for p in hwm_pids), default=0) / 1024, 1),
    )


def print_result(r: PhaseResult) -> None:
    print(
        f"{r.server:<10} {r.phase:<13} {r.per_second:>9.1f}/s {r.commands:>7} cmds "
        f"p50 {r.p50_ms:>6.2f} ms p99 {r.p99_ms:>7.2f} ms  "
        f"server {r.server_cpu_ms_per_cmd:>6.3f} ms/cmd ({r.server_cpu_cores:.2f} cores)  "
        f"client {r.client_cpu_ms_per_cmd:.3f} ms/cmd  machine {r.machine_busy_cores:.2f} cores"
        + (f"  postgres {r.database_cpu_ms_per_cmd:.3f} ms/cmd" if r.database_cpu_ms_per_cmd
           else "")
        + (f"  FAILED {r.failed}" if r.failed else "")
        + (f"\n{'':<24}server memory peak: PSS {r.peak_pss_mib:.1f} MiB, "
           f"RSS {r.peak_rss_mib:.1f} MiB" if r.peak_pss_mib else "")
        + (f", VmHWM {r.vmhwm_mib:.1f} MiB" if r.vmhwm_mib else ""),
        flush=True,
    )
    if len(r.by_kind) > 1:
        for kind, k in r.by_kind.items():
            print(f"{'':<24}{kind:<13} {k['commands']:>7} p50 {k['p50_ms']:.2f} ms "
                  f"p99 {k['p99_ms']:.2f} ms mean {k['mean_ms']:.2f} ms", flush=True)


async def open_sessions(
    port: int, logins: list[str], args: argparse.Namespace
) -> list[BenchSession]:
    """``--clients`` sessions, logged in with INBOX selected."""
    append_msg = message(10_000_000, args.size)
    sessions = []
    for i in range(args.clients):
        client = await ImapClient.connect(port)
        sessions.append(BenchSession(client, logins[i % len(logins)], args.layout == "shared",
                                     append_msg))
    for s in sessions:  # one login at a time: servers limit logins in progress
        await s.open()
    return sessions


async def close_sessions(sessions: Sequence[BenchSession | ChurnSession]) -> None:
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


async def churn_phase(
    name: str,
    port: int,
    args: argparse.Namespace,
    server_cpu: Callable[[], float],
    server_pid: int | None = None,
) -> PhaseResult:
    """The churn phase on its own sessions (all on CHURN_LOGIN), then its
    checker: after a final NOOP each session's view must be storage's."""
    sessions = await open_churn(port, CHURN_LOGIN, args.churn_clients, args.churn_floor)
    try:
        r = await run_phase(name, "churn", sessions, args.seconds, server_cpu)
        print_result(r)
        if "churn" in args.profile and server_pid is not None:
            await profile_phase(name, "churn", sessions, args, server_cpu, server_pid)
        problems = await verify(sessions, port)
    finally:
        await close_sessions(sessions)
    r.checker = dict(problems.counts)
    appended = sum(s.appended for s in sessions)
    smallest = min(s.smallest_view for s in sessions)
    print(f"{'':<24}churn checker: {appended} appends, smallest view {smallest}; "
          + problems.report().replace("\n", "\n" + " " * 24), flush=True)
    return r


def client_tls() -> ssl.SSLContext:
    """The bench's TLS client side: both servers have self-signed certificates."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def conn_memory_phase(srv: Server, logins: list[str], args: argparse.Namespace
                            ) -> list[MemoryResult]:
    """Issue #24: what an idle logged-in connection costs the server. For
    plaintext and then implicit TLS: ``--conn-count`` new connections, each
    LOGIN then SELECT INBOX (the selected state, where a real client idles),
    ``--conn-batch`` at a time (servers bound the logins in progress per
    address); the server's PSS (every process of it) before and after,
    each the median of 5 samples once quiet, divided by the count."""
    out: list[MemoryResult] = []
    n = args.conn_count
    for transport, port, tls in (("plain", srv.port, None), ("tls", srv.tls_port, client_tls())):
        await asyncio.sleep(1.0)
        before = await _quiet_memory(srv.pids)
        clients: list[ImapClient] = []
        t0 = time.perf_counter()
        try:
            await _open_idle(srv.name, transport, port, tls, logins, args, clients)
            opened = time.perf_counter() - t0
            await asyncio.sleep(2.0)  # idle: every reply sent, nothing in flight
            after = await _quiet_memory(srv.pids)
        finally:
            await _close_all(clients)
        r = MemoryResult(
            server=srv.name, phase="conn_memory", transport=transport, connections=n,
            pss_before_kib=before[0], pss_after_kib=after[0],
            rss_before_kib=before[1], rss_after_kib=after[1],
            pss_per_conn_kib=round((after[0] - before[0]) / n, 1),
            rss_per_conn_kib=round((after[1] - before[1]) / n, 1),
            open_seconds=round(opened, 1), loadavg=round(os.getloadavg()[0], 2),
        )
        print(f"{r.server:<10} conn_memory   {transport:<5} {n} idle selected sessions: "
              f"PSS {r.pss_per_conn_kib:.1f} KiB/conn ({before[0] / 1024:.1f} -> "
              f"{after[0] / 1024:.1f} MiB), RSS {r.rss_per_conn_kib:.1f} KiB/conn "
              f"({before[1] / 1024:.1f} -> {after[1] / 1024:.1f} MiB); opened in "
              f"{opened:.1f} s, loadavg {r.loadavg:.2f}", flush=True)
        out.append(r)
    return out


async def _open_idle(
    name: str,
    transport: str,
    port: int,
    tls: ssl.SSLContext | None,
    logins: list[str],
    args: argparse.Namespace,
    clients: list[ImapClient],
) -> None:
    """``--conn-count`` connections into ``clients``, each logged in with
    INBOX selected, ``--conn-batch`` at a time."""
    gate = asyncio.Semaphore(args.conn_batch)

    async def open_one(i: int) -> None:
        async with gate:
            client = await ImapClient.connect(port, tls=tls)
            clients.append(client)
            login = logins[i % len(logins)]
            for line in (b'LOGIN "%s" "%s"' % (login.encode(), PASSWORD.encode()),
                         b"SELECT INBOX"):
                status, text = await client.command(line, keep=True)
                if status != b"OK":
                    raise RuntimeError(f"{name} {transport} #{i}: {line[:5]!r} -> "
                                       f"{text[-200:]!r}")

    await asyncio.gather(*(open_one(i) for i in range(args.conn_count)))


async def _close_all(clients: list[ImapClient]) -> None:
    """LOGOUT and close every client, 64 at a time."""
    gate = asyncio.Semaphore(64)

    async def close_one(c: ImapClient) -> None:
        async with gate:
            await c.close()

    await asyncio.gather(*(close_one(c) for c in clients), return_exceptions=True)


async def _quiet_memory(pids: Callable[[], list[int]]) -> tuple[int, int]:
    """(PSS, RSS) KiB of the server, the median of 5 samples 0.2 s apart."""
    samples = []
    for _ in range(5):
        samples.append(proc_memory_kib(pids()))
        await asyncio.sleep(0.2)
    return (int(statistics.median(p for p, _ in samples)),
            int(statistics.median(r for _, r in samples)))


async def bench_server(
    srv: Server,
    logins: list[str],
    args: argparse.Namespace,
) -> list[PhaseResult | MemoryResult]:
    name, port, server_cpu, server_pid = srv.name, srv.port, srv.cpu_seconds, srv.pid
    database_cpu, settle = srv.database_cpu, srv.settle
    sessions = await open_sessions(port, logins, args)
    out: list[PhaseResult | MemoryResult] = []
    try:
        if args.warmup > 0:
            await run_phase(name, "mixed", sessions, args.warmup, server_cpu)
        if settle is not None:
            await settle()  # the fill's deferred work, before any phase is measured
        for phase in args.phases:
            if phase == "churn":
                out.append(await churn_phase(name, port, args, server_cpu, server_pid))
                continue
            if phase == "conn_memory":
                out += await conn_memory_phase(srv, logins, args)
                continue
            r = await run_phase(
                name, phase, sessions, args.seconds, server_cpu, database_cpu, settle,
                srv.pids, srv.hwm_pids,
            )
            print_result(r)
            out.append(r)
            if phase in args.profile and server_pid is not None:
                await profile_phase(name, phase, sessions, args, server_cpu, server_pid)
    finally:
        await close_sessions(sessions)
    return out


async def profile_phase(
    name: str,
    phase: str,
    sessions: Sequence[BenchSession | ChurnSession],
    args: argparse.Namespace,
    server_cpu: Callable[[], float],
    pid: int,
) -> None:
    """Run ``phase`` again under py-spy (figures not counted: sampling slows
    the server) and save the raw (collapsed) stacks."""
    if shutil.which("py-spy") is None:
        print("py-spy not installed; no profile", file=sys.stderr)
        return
    outdir = _mkdir(Path(args.profile_dir))
    out = outdir / f"{name.replace('/', '-')}-{phase}.txt"  # "shardmail/pg": one file name
    seconds = int(args.seconds)
    spy_args = ["py-spy", "record", "-p", str(pid), "-f", "raw", "-d", str(seconds), "-o", str(out)]
    # --gil: only the thread holding the GIL (Python work); without it every
    # thread's non-idle samples, SQLite's C work in the aiosqlite thread too.
    spy_args += ["--gil"] if args.profile_gil else ["--threads", "--native"]
    spy = await asyncio.create_subprocess_exec(
        *spy_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    await asyncio.sleep(1.0)  # let py-spy attach
    r = await run_phase(name + "+spy", phase, sessions, seconds - 1.5, server_cpu)
    await spy.wait()
    print(f"{'':<24}profile of {phase} ({r.per_second:.0f}/s under py-spy): {out}", flush=True)


# ------------------------------------------------------------------ servers
def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def churn_fill(args: argparse.Namespace) -> list[bytes]:
    """The churn account's first messages: random sizes, the same bytes on
    every server of one run."""
    rng = random.Random(args.churn_messages)
    return [churn_message(0, i, rng)[1] for i in range(args.churn_messages)]


def logins_for(args: argparse.Namespace) -> list[str]:
    count = 1 if args.layout == "shared" else args.clients
    return [f"user{n}@{DOMAIN}" for n in range(count)]


async def fill_shardmail(
    data_dir: Path, logins: list[str], args: argparse.Namespace, overrides: Sequence[str] = ()
) -> None:
    from conf.settings import load_settings
    from storage import open_storage, password_hasher
    from storage.ingest import Delivery, ingest

    settings = load_settings(None, [f'server.data_dir="{data_dir}"', *overrides])
    _mkdir(data_dir)
    storage = await open_storage(settings.storage, password_hasher=password_hasher(settings.auth))
    try:
        await storage.directory.add_domain(DOMAIN)
        accounts = [await storage.directory.add_account(a, PASSWORD) for a in logins]

        async def fill_one(account: Account) -> None:
            for i in range(args.messages):
                await ingest(storage, [Delivery(account, "INBOX")], message(i, args.size))

        await asyncio.gather(*(fill_one(a) for a in accounts))
        if "churn" in args.phases:
            churner = await storage.directory.add_account(CHURN_LOGIN, PASSWORD)
            for raw in churn_fill(args):
                await ingest(storage, [Delivery(churner, "INBOX")], raw)
    finally:
        await storage.close()


# conn_memory logs in thousands of times, which the default argon2id cost
# (64 MiB, 3 passes, several tenths of a second each here) would make take
# most of an hour: with that phase the accounts get cheap hashes, and imapd
# the same settings so that no login upgrades them (Dovecot's passwd-file
# holds plain passwords: it hashes nothing either).
CHEAP_HASHES = (
    "auth.argon2_time_cost=1", "auth.argon2_memory_kib=64", "auth.argon2_parallelism=1",
)


def hash_overrides(args: argparse.Namespace) -> list[str]:
    return list(CHEAP_HASHES) if "conn_memory" in args.phases else []


def max_connections(args: argparse.Namespace) -> int:
    """How many connections from 127.0.0.1 the servers must allow at once."""
    conn = args.conn_count if "conn_memory" in args.phases else 0
    return conn + args.clients + args.churn_clients + 100


def start_imapd(
    data_dir: Path,
    port: int,
    log_level: str,
    procs: int = 1,
    extra: Sequence[str] = (),
    tls_port: int | None = None,
) -> list[subprocess.Popen[bytes]]:
    """``procs`` imapd processes sharing the port (SO_REUSEPORT, as
    DESIGN.md scales a host out); returns once each answers."""
    overrides = [
        f'server.data_dir="{data_dir}"',
        f"server.log_level=\"{log_level}\"",
        f"imap.listen=['127.0.0.1:{port}']",
        f"imap.tls_listen=['127.0.0.1:{tls_port or free_port()}']",
        f"pop3.listen=['127.0.0.1:{free_port()}']",
        f"pop3.tls_listen=['127.0.0.1:{free_port()}']",
        "auth.allow_plaintext=true",
        *extra,
    ]
    cmd = [sys.executable, "-m", "imapd"]
    for o in overrides:
        cmd += ["-o", o]
    started: list[subprocess.Popen[bytes]] = []
    for n in range(procs):
        logfile = data_dir / f"imapd{n}.log"
        with open(logfile, "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )
        started.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if b"shardmail ready" in logfile.read_bytes():  # not "already in use"
                break
            time.sleep(0.1)
        else:
            for p in started:
                stop_process(p)
            raise RuntimeError("imapd did not start:\n" + logfile.read_text()[-3000:])
    return started


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Server:
    """A server under test, started and filled: its name in the results,
    its port, its CPU seconds so far, and a PID py-spy can attach to."""

    name: str
    port: int
    cpu_seconds: Callable[[], float]
    pid: int | None = None
    database_cpu: Callable[[], float] = lambda: 0.0  # PostgreSQL's, when the bench runs it
    settle: Callable[[], Awaitable[None]] | None = None  # BenchStorage.settle
    tls_port: int = 0  # implicit TLS (RFC 8314), same contents
    pids: Callable[[], list[int]] = list  # every process of the server, now
    hwm_pids: Sequence[int] = ()  # whose VmHWM is the server's peak (shardmail's)


@contextlib.asynccontextmanager
async def shardmail_server(
    workdir: Path, args: argparse.Namespace, store: BenchStorage | None = None
) -> AsyncIterator[Server]:
    """imapd on ``store`` (SQLite in its data dir by default), filled."""
    store = store or BenchStorage("sqlite", "")
    logins = logins_for(args)
    data_dir = workdir / f"shardmail-{store.backend}"
    t0 = time.perf_counter()
    await fill_shardmail(data_dir, logins, args, [*store.overrides, *hash_overrides(args)])
    print(f"# shardmail: filled {len(logins)} x {args.messages} messages of {args.size} octets "
          f"in {time.perf_counter() - t0:.1f} s (storage.ingest)", flush=True)
    port, tls_port = free_port(), free_port()
    # Every bench connection comes from 127.0.0.1: imap.max_connections_per_ip
    # (50 by default) must let all of them in (the connection rate does not
    # apply: server.connect_rate_exempt holds loopback by default).
    limit = f"imap.max_connections_per_ip={max_connections(args)}"
    procs = start_imapd(
        data_dir, port, args.log_level, args.imapd_procs,
        [limit, *hash_overrides(args), *store.overrides, *args.overrides], tls_port=tls_port,
    )
    name = "shardmail" if args.imapd_procs == 1 else f"shardmail×{args.imapd_procs}"
    if store.backend != "sqlite":
        name += "/pg"
    pids = [p.pid for p in procs]
    try:
        yield Server(name, port, lambda: sum(proc_cpu_seconds(p.pid) for p in procs),
                     procs[0].pid, store.cpu_seconds, store.settle, tls_port, lambda: pids, pids)
    finally:
        for p in procs:
            stop_process(p)


@contextlib.asynccontextmanager
async def dovecot_server(workdir: Path, args: argparse.Namespace) -> AsyncIterator[Server]:
    logins = logins_for(args)
    os.chmod(workdir, 0o755)  # Dovecot's unprivileged processes must reach their files
    # For conn_memory, imap processes serving several clients each (the
    # issue's comparison; Dovecot's default is a process per client).
    client_limit = args.dovecot_client_limit if "conn_memory" in args.phases else None
    peer = DovecotPeer(workdir / "dovecot", tls=True, imap_client_limit=client_limit,
                       max_connections=max_connections(args))
    try:
        when = time.time()
        for login in logins:
            peer.add_user(login, PASSWORD)
            peer.add_messages(login, (message(i, args.size) for i in range(args.messages)),
                              when=when)
        if "churn" in args.phases:
            peer.add_user(CHURN_LOGIN, PASSWORD)
            peer.add_messages(CHURN_LOGIN, churn_fill(args), when=when)
        peer.start()
        print(f"# dovecot: {len(logins)} x {args.messages} messages in Maildir, "
              f"port {peer.port}", flush=True)
        yield Server("dovecot", peer.port, peer.cpu_seconds, tls_port=peer.tls_port,
                     pids=lambda: process_tree(peer.pid))
    finally:
        peer.stop()


Result = PhaseResult | MemoryResult


async def run_shardmail(workdir: Path, args: argparse.Namespace) -> list[Result]:
    """The phases on shardmail, once per ``--backend``, each on fresh storage."""
    results: list[Result] = []
    for backend in args.backend:
        async with bench_storage(backend, args.storage_url) as store:
            async with shardmail_server(workdir, args, store) as srv:
                results += await bench_server(srv, logins_for(args), args)
    if len(args.backend) > 1:
        print(f"\n# commands per second against {args.backend[0]} (same run)")
        rates = [r for r in results if isinstance(r, PhaseResult)]
        first = {r.phase: r for r in rates if r.server == results[0].server}
        for r in rates:
            base = first.get(r.phase)
            if r.server != results[0].server and base is not None and base.per_second:
                print(f"{r.server:<13} {r.phase:<13} {r.per_second:>9.1f} / "
                      f"{base.per_second:>9.1f} = {r.per_second / base.per_second:.2f}")
    return results


async def run_dovecot(workdir: Path, args: argparse.Namespace) -> list[Result]:
    async with dovecot_server(workdir, args) as srv:
        return await bench_server(srv, logins_for(args), args)


async def run_interleaved(workdir: Path, args: argparse.Namespace) -> list[Result]:
    """Both servers up at once, each with its own kept sessions; every phase
    runs on one and then at once on the other, ``--rounds`` times, the order
    swapped each round. A pair's two runs are seconds apart, so a change
    in the shared machine's load skews both alike; each pair gives a ratio."""
    logins = logins_for(args)
    results: list[Result] = []
    async with shardmail_server(workdir, args) as ours, dovecot_server(workdir, args) as peer:
        servers = [ours, peer]
        sessions = {srv.name: await open_sessions(srv.port, logins, args) for srv in servers}
        try:
            for srv in servers:
                if args.warmup > 0:
                    await run_phase(srv.name, "mixed", sessions[srv.name], args.warmup,
                                    srv.cpu_seconds)
            for n in range(args.rounds):
                print(f"# round {n + 1} of {args.rounds}", flush=True)
                for phase in args.phases:
                    for srv in servers if n % 2 == 0 else servers[::-1]:
                        if phase == "churn":
                            results.append(await churn_phase(srv.name, srv.port, args,
                                                             srv.cpu_seconds))
                            continue
                        if phase == "conn_memory":
                            results += await conn_memory_phase(srv, logins, args)
                            continue
                        r = await run_phase(srv.name, phase, sessions[srv.name], args.seconds,
                                            srv.cpu_seconds, pids=srv.pids,
                                            hwm_pids=srv.hwm_pids)
                        print_result(r)
                        results.append(r)
        finally:
            for group in sessions.values():
                await close_sessions(group)
    return results


async def add_accounts(data_dir: Path, logins: list[str], overrides: Sequence[str]) -> None:
    """The accounts alone (no mail), hashed at the configured argon2 cost."""
    from conf.settings import load_settings
    from storage import open_storage, password_hasher

    settings = load_settings(None, [f'server.data_dir="{data_dir}"', *overrides])
    _mkdir(data_dir)
    storage = await open_storage(settings.storage, password_hasher=password_hasher(settings.auth))
    try:
        await storage.directory.add_domain(DOMAIN)
        for login in logins:
            await storage.directory.add_account(login, PASSWORD)
    finally:
        await storage.close()


async def run_logins(workdir: Path, args: argparse.Namespace) -> list[PhaseResult]:
    """The login phase: ``--clients`` clients, each on an account and a
    loopback address of its own, logging in and out for ``--seconds``.
    shardmail twice over one data directory: "shardmail" with the
    authentication cache (every account logged in once first: returning
    users) and "shardmail-cold" with ``auth.cache_ttl_seconds=0`` (every
    login verifies argon2); with ``--compare-dovecot`` one Dovecot per
    ``--dovecot-schemes`` (its auth cache off, its default). ``--rounds``
    rounds (at least one), the servers' order reversed every other round."""
    logins = [f"login{n}@{DOMAIN}" for n in range(args.clients)]
    sources = [f"127.0.{1 + n // 250}.{1 + n % 250}" for n in range(args.clients)]
    data_dir = workdir / "shardmail-login"
    await add_accounts(data_dir, logins, args.overrides)
    results: list[PhaseResult] = []
    async with contextlib.AsyncExitStack() as stack:
        servers: list[Server] = []
        for name, extra in (("shardmail", []), ("shardmail-cold", ["auth.cache_ttl_seconds=0"])):
            port = free_port()
            procs = start_imapd(data_dir, port, args.log_level, 1, [*args.overrides, *extra])
            stack.callback(lambda ps=procs: [stop_process(p) for p in ps])
            servers.append(Server(name, port, lambda pid=procs[0].pid: proc_cpu_seconds(pid),
                                  procs[0].pid))
        if args.compare_dovecot:
            os.chmod(workdir, 0o755)  # Dovecot's unprivileged processes must reach their files
            for scheme in args.dovecot_schemes:
                peer = DovecotPeer(workdir / f"dovecot-{scheme.lower()}")
                stack.callback(peer.stop)
                for login in logins:
                    peer.add_user(login, PASSWORD, scheme)
                peer.start()
                servers.append(Server(f"dovecot-{scheme}", peer.port, peer.cpu_seconds))
        pairs = list(zip(logins, sources, strict=True))
        sessions = {srv.name: [LoginSession(srv.port, lg, src) for lg, src in pairs]
                    for srv in servers}
        for srv in servers:  # unmeasured: one login per account (shardmail's cache warms)
            statuses = await asyncio.gather(*(s.once() for s in sessions[srv.name]))
            if set(statuses) != {b"OK"}:
                raise RuntimeError(f"{srv.name}: first logins answered {statuses}")
        for n in range(max(1, args.rounds)):
            print(f"# login round {n + 1}, loadavg {os.getloadavg()[0]:.2f}", flush=True)
            for srv in servers if n % 2 == 0 else servers[::-1]:
                r = await run_phase(srv.name, "login", sessions[srv.name], args.seconds,
                                    srv.cpu_seconds)
                print_result(r)
                results.append(r)
    print("\n# logins per second and server CPU ms per login, medians of the rounds")
    for srv in servers:
        mine = [r for r in results if r.server == srv.name]
        print(f"{srv.name:<22} {statistics.median(r.per_second for r in mine):7.1f}/s  "
              f"{statistics.median(r.server_cpu_ms_per_cmd for r in mine):7.2f} ms/login  "
              f"p50 {statistics.median(r.p50_ms for r in mine):6.1f} ms  "
              f"(rounds: {' '.join(f'{r.per_second:.1f}' for r in mine)})", flush=True)
    return results


def print_interleaved(all_results: list[Result], phases: Sequence[str]) -> None:
    """Per phase: each round's ratio (ours / Dovecot's commands per second,
    the two runs of one round), their median and range."""
    print("\n# shardmail / dovecot commands per second, round by round")
    results = [r for r in all_results if isinstance(r, PhaseResult)]
    for phase in phases:
        ours = [r for r in results if r.phase == phase and r.server.startswith("shardmail")]
        theirs = [r for r in results if r.phase == phase and r.server == "dovecot"]
        ratios = [a.per_second / b.per_second
                  for a, b in zip(ours, theirs, strict=True) if b.per_second]
        if not ratios:
            continue
        rounds = " ".join(f"{x:.2f}" for x in ratios)
        print(f"{phase:<13} median {statistics.median(ratios):.2f}  "
              f"range {min(ratios):.2f}-{max(ratios):.2f}  rounds: {rounds}  "
              f"(commands/s {statistics.median(a.per_second for a in ours):.0f} vs "
              f"{statistics.median(b.per_second for b in theirs):.0f}, server CPU ms/cmd "
              f"{statistics.median(a.server_cpu_ms_per_cmd for a in ours):.3f} vs "
              f"{statistics.median(b.server_cpu_ms_per_cmd for b in theirs):.3f})")


async def storage_calls(args: argparse.Namespace) -> None:
    """The storage calls behind the IMAP commands, timed alone in this
    process (one caller, no IMAP): where the server's time per command goes."""
    from conf.settings import load_settings
    from storage import open_storage
    from storage.ingest import Delivery, ingest
    from storage.model import StoreMode, UidSet

    workdir = Path(tempfile.mkdtemp(prefix="imap-bench-storage-", dir=args.tmp))
    try:
        settings = load_settings(None, [f'server.data_dir="{workdir}"'])
        storage = await open_storage(settings.storage)
        try:
            await storage.directory.add_domain(DOMAIN)
            account = await storage.directory.add_account(f"user0@{DOMAIN}", PASSWORD)
            n = min(args.messages, 200)
            for i in range(n):
                await ingest(storage, [Delivery(account, "INBOX")], message(i, args.size))
            mail = storage.mail(account)
            box = await mail.get_mailbox(account.id, "INBOX")
            top = (await mail.get_mailbox(account.id, "INBOX")).highestmodseq
            a, m = account.id, box.id

            def store(i: int) -> object:
                mode = StoreMode.ADD if (i // n) % 2 == 0 else StoreMode.REMOVE
                return mail.store_flags(a, m, UidSet.of([i % n + 1]), mode, ("\\Seen",))

            calls: list[tuple[str, Callable[[int], object]]] = [
                ("get_mailbox", lambda i: mail.get_mailbox(a, "INBOX")),
                ("fetch (1 uid, parsed)", lambda i: mail.fetch(a, m, UidSet.of([i % n + 1]))),
                ("changes_since (1 back)", lambda i: mail.changes_since(a, m, top - 1)),
                ("store_flags (1 uid)", store),
                ("claim_recent", lambda i: mail.claim_recent(a, m)),
                ("ingest 1 message", lambda i: ingest(
                    storage, [Delivery(account, "INBOX")], message(n + i, args.size))),
            ]
            print(f"# storage calls alone, one caller, {n} messages in the mailbox")
            for name, call in calls:
                rounds = 200
                t0, c0 = time.perf_counter(), time.process_time()
                for i in range(rounds):
                    await call(i)  # type: ignore[misc]
                wall = (time.perf_counter() - t0) / rounds * 1000
                cpu = (time.process_time() - c0) / rounds * 1000
                print(f"{name:<24} {wall:6.2f} ms wall {cpu:6.2f} ms CPU per call", flush=True)
        finally:
            await storage.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def raise_fd_limit(needed: int) -> None:
    """The soft open-files limit up to the hard one (conn_memory holds
    thousands of sockets here, and the servers, started from here,
    inherit the limit); a clear error if even that is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"open-files hard limit {hard} < {needed}: raise it (ulimit -Hn)")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main_async(args: argparse.Namespace) -> list[Result]:
    if args.storage_calls:
        await storage_calls(args)
        return []
    # Both ends of each connection are ours when the server is shardmail.
    raise_fd_limit(2 * max_connections(args) + 1000)
    workdir = Path(tempfile.mkdtemp(prefix="imap-bench-", dir=args.tmp))
    if args.phases == ["login"]:
        print(f"# {args.clients} clients logging in and out, {args.seconds:g} s per run; "
              f"{os.cpu_count()} CPUs, loadavg {os.getloadavg()[0]:.2f}", flush=True)
    else:
        print(f"# {args.clients} sessions ({args.layout} layout), {args.messages} x {args.size} "
              f"octets per INBOX, {args.seconds:g} s per phase, one command at a time per "
              f"session; {os.cpu_count()} CPUs, loadavg {os.getloadavg()[0]:.2f}", flush=True)
    results: list[Result] = []
    try:
        if "login" in args.phases:
            results += await run_logins(workdir, args)
            args.phases = [p for p in args.phases if p != "login"]
            if not args.phases:
                return results
        if args.rounds:
            results = await run_interleaved(workdir, args)
            print_interleaved(results, args.phases)
            return results
        if not args.dovecot_only:
            results += await run_shardmail(workdir, args)
        if args.compare_dovecot or args.dovecot_only:
            results += await run_dovecot(workdir, args)
    finally:
        if args.keep:
            print(f"# kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.compare_dovecot and not args.dovecot_only:
        print("\n# shardmail / dovecot commands per second")
        rates = [r for r in results if isinstance(r, PhaseResult)]
        dove = {r.phase: r for r in rates if r.server == "dovecot"}
        for r in rates:
            d = dove.get(r.phase)
            if r.server.startswith("shardmail") and d is not None and d.per_second:
                print(f"{r.phase:<13} {r.per_second:>9.1f} / {d.per_second:>9.1f} "
                      f"= {r.per_second / d.per_second:.2f}  (server CPU ms/cmd "
                      f"{r.server_cpu_ms_per_cmd:.3f} vs {d.server_cpu_ms_per_cmd:.3f})")
        print_memory(results)
    return results


def print_memory(results: list[Result]) -> None:
    """shardmail's memory against Dovecot's: per idle connection (KiB), and
    the peak of each phase (MiB)."""
    pairs: dict[str, dict[str, float]] = {}
    for r in results:
        if isinstance(r, MemoryResult):
            what, value = f"conn_memory {r.transport} PSS per connection (KiB)", r.pss_per_conn_kib
        elif r.peak_pss_mib:
            what, value = f"{r.phase} peak PSS (MiB)", r.peak_pss_mib
        else:
            continue
        side = "dovecot" if r.server == "dovecot" else "shardmail"
        pairs.setdefault(what, {})[side] = value
    for what, pair in pairs.items():
        if len(pair) == 2:
            print(f"{what}: {pair['shardmail']:.1f} vs {pair['dovecot']:.1f} (dovecot)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="concurrent kept sessions")
    parser.add_argument("--messages", type=int, default=500, help="messages per INBOX")
    parser.add_argument("--size", type=int, default=5 * 1024, help="message size, octets")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured mixed load first")
    parser.add_argument("--layout", choices=("accounts", "shared"), default="accounts",
                        help="one account per session, or one account for all sessions")
    parser.add_argument("--phases", type=lambda s: s.split(","), default=list(DEFAULT_PHASES),
                        help="comma-separated, from: " + ",".join(MIXES))
    parser.add_argument("--churn-clients", type=int, default=10,
                        help="sessions of the churn phase, all on one account")
    parser.add_argument("--churn-messages", type=int, default=200,
                        help="messages in the churn account's INBOX at the start")
    parser.add_argument("--churn-floor", type=int, default=35,
                        help="a churn session appends only while its view holds fewer")
    parser.add_argument("--conn-count", type=int, default=1000,
                        help="conn_memory: idle connections opened per transport")
    parser.add_argument("--conn-batch", type=int, default=4,
                        help="conn_memory: connections logging in at a time")
    parser.add_argument("--dovecot-client-limit", type=int, default=100,
                        help="with conn_memory: clients per Dovecot imap process")
    parser.add_argument("--compare-dovecot", action="store_true",
                        help="then run the same phases against Dovecot on the same contents")
    parser.add_argument("--dovecot-only", action="store_true")
    parser.add_argument("--dovecot-schemes", type=lambda s: s.split(","),
                        default=["SHA512-CRYPT", "ARGON2ID"],
                        help="login phase: one Dovecot per passdb scheme (doveadm pw -s)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="with --compare-dovecot: run each phase on both servers, one "
                             "right after the other, this many times (order swapped each "
                             "round), and report the ratio of each pair")
    parser.add_argument("--storage-calls", action="store_true",
                        help="only time the storage calls behind the commands, in-process")
    parser.add_argument("--profile", type=lambda s: s.split(","), default=[],
                        help="phases to repeat under py-spy (shardmail only)")
    parser.add_argument("--profile-dir", default="bench-profiles")
    parser.add_argument("--profile-gil", action=argparse.BooleanOptionalAction, default=True,
                        help="py-spy --gil (default), or every thread with native frames")
    parser.add_argument("--imapd-procs", type=int, default=1,
                        help="imapd processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--log-level", default="WARNING", help="imapd log level")
    add_override_option(parser, "pass a setting override to imapd (repeatable)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tmp", default=None, help="where the temporary data goes")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    add_storage_options(parser)
    args = parser.parse_args()
    check_backends(parser, args)
    if args.rounds and not args.compare_dovecot:
        parser.error("--rounds needs --compare-dovecot")
    for phase in args.phases:
        if phase not in MIXES:
            parser.error(f"unknown phase {phase!r}")
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
