"""Capacity inputs (issue #19): what one delivered message and one IMAP
command cost on a durable PostgreSQL shard, measured in one run.

The site is ``bench/shard_scale.py``'s with one shard: a durable PostgreSQL
server (``fsync``, ``synchronous_commit`` and ``full_page_writes`` on) with
the directory and the shard in databases of their own, blobs in files under
the data dir. Steps, each with the machine's load average beside it:

1. SMTP: ``mtad`` in a process of its own; ``--messages`` messages of each
   of ``--sizes`` octets (±10%, random: a text part of words, and above
   16 KB a base64 attachment of random bytes, as real mail has) over
   ``--sessions`` sessions to ``--accounts`` accounts in turn. Per message:
   mtad CPU, PostgreSQL CPU (every postgres process, from /proc), bytes
   PostgreSQL wrote (``/proc/PID/io`` write_bytes: WAL and heap; each
   window starts and ends with the search index's pending list merged and
   a CHECKPOINT, so deferred index work and dirty pages count in the window
   that caused them, ``settle``), WAL bytes and full-page images (``pg_stat_wal``), bytes mtad
   wrote and the blob folder's growth, and the shard's growth per table
   (``pg_total_relation_size``, indexes and TOAST included, and rows).
2. IMAP: ``imapd`` in a process of its own over the same storage, one
   session per account on the mailboxes step 1 filled; ``UID FETCH n
   (BODY.PEEK[])``, ``UID STORE``, ``SELECT INBOX``, ``APPEND`` of 5 KB
   (``bench/imap_bench.py``'s phases), each for ``--seconds``: commands/s,
   imapd and PostgreSQL CPU per command.
3. IDLE: ``--idle`` more connections, each LOGIN, SELECT and IDLE (RFC
   2177), in plaintext and then over implicit TLS, each on an imapd of its
   own: imapd and PostgreSQL CPU per new connection, imapd's resident
   memory per idle connection (RSS delta) with the mailbox size it holds,
   PostgreSQL connections they opened, and the CPU they cost at rest over
   ``--idle-seconds``. A LOGIN at the default argon2id cost is measured
   apart, on step 2's sessions.

Never part of the test run; keep runs short on a shared machine::

    python -m bench.capacity_measure --messages 1500 --sizes 5120,51200 --seconds 8 --idle 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncpg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.dovecot_peer import free_port, proc_cpu_seconds, process_tree  # noqa: E402
from bench.imap_bench import (  # noqa: E402
    PASSWORD,
    open_sessions,
    run_phase,
    start_imapd,
    stop_process,
)
from bench.search_bench import vocabulary  # noqa: E402
from bench.shard_scale import (  # noqa: E402
    Site,
    load,
    make_accounts,
    postgres_cpu_seconds,
    start_mtad,
    start_site,
    stop_site,
)
from tests.dnsserver import Zone, start_dns_server, stop_dns_server  # noqa: E402

IMAP_PHASES = ("fetch_body", "store", "select", "append")
ATTACH_ABOVE = 16 * 1024  # a message larger than this carries a binary attachment


# ------------------------------------------------------------------ messages
class Words:
    """Words of ``bench/search_bench.py``'s vocabulary (English letter
    frequencies, so their trigrams vary as a real language's, which is what
    the shard's trigram index pays for), drawn Zipf-weighted."""

    def __init__(self, rng: random.Random) -> None:
        self.words = vocabulary(rng)
        rng.shuffle(self.words)  # sorted, the word of rank 1 would be "aa"
        self.cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(len(self.words))))

    def pick(self, rng: random.Random, k: int) -> str:
        return " ".join(rng.choices(self.words, cum_weights=self.cum, k=k))

    def text(self, rng: random.Random, size: int) -> str:
        lines, total = [], 0
        while total < size:
            line = self.pick(rng, rng.randint(6, 12)) + "\r\n"
            lines.append(line)
            total += len(line)
        return "".join(lines)


def capacity_message(n: int, rcpt: str, size: int, rng: random.Random, words: Words) -> bytes:
    """A message of about ``size`` octets (±10%): a text/plain part of words,
    and above ATTACH_ABOVE a base64 attachment of random bytes filling the
    rest (RFC 2045 section 6.8: lines of at most 76 characters)."""
    target = int(size * rng.uniform(0.9, 1.1))
    header = (
        f"From: Sender {n % 97} <sender{n % 97}@example.net>\r\nTo: {rcpt}\r\n"
        f"Subject: {words.pick(rng, 6)}\r\n"
        f"Date: Sat, 5 Dec 2026 10:{n % 60:02d}:00 +0000\r\n"
        f"Message-ID: <cap-{n}-{time.time_ns()}@example.net>\r\nMIME-Version: 1.0\r\n"
    )
    attach = target > ATTACH_ABOVE
    text = words.text(rng, 3000 if attach else target - len(header) - 200)
    if not attach:
        return (header + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + text).encode()
    # Base64 turns 3 octets into 4 and each line of 76 gains a CRLF.
    room = (target - len(header) - len(text) - 400) * 76 // 78
    raw = rng.randbytes(max(1, room * 3 // 4))
    b64 = base64.b64encode(raw).decode()
    lines = "\r\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    boundary = f"b{n:x}{rng.getrandbits(32):x}"
    return (
        header
        + f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        + f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}"
        + f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        + 'Content-Disposition: attachment; filename="data.bin"\r\n'
        + f"Content-Transfer-Encoding: base64\r\n\r\n{lines}\r\n--{boundary}--\r\n"
    ).encode()


# -------------------------------------------------------------- measurement
def io_write_bytes(pid: int) -> int:
    """Bytes ``pid`` caused to be written to storage (its own and, as the
    kernel adds them at reaping, its reaped children's): /proc/PID/io."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def postgres_write_bytes(site: Site) -> int:
    """write_bytes of every postgres process: each postmaster (with the
    backends it has reaped) and every live child."""
    total = 0
    for server in site.servers:
        postmaster = server.proc.pid
        total += io_write_bytes(postmaster)
        for pid in process_tree(postmaster):
            if pid != postmaster:
                with contextlib.suppress(OSError):
                    total += io_write_bytes(pid)
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def folder_usage(path: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes) under ``path``."""
    files = size = blocks = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                files, size, blocks = files + 1, size + st.st_size, blocks + st.st_blocks
    return files, size, blocks * 512


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@dataclass
class DbStats:
    """The shard's counters and sizes at one moment."""

    wal_bytes: int
    wal_fpi: int
    buffers_written: int  # checkpoint + background writer + backends, 8 KiB each
    tables: dict[str, tuple[int, int]]  # table -> (rows, bytes with indexes and TOAST)


async def db_stats(url: str) -> DbStats:
    conn = await asyncpg.connect(_dsn(url))
    try:
        wal = await conn.fetchrow("SELECT wal_bytes::bigint AS b, wal_fpi FROM pg_stat_wal")
        bg = await conn.fetchval(
            "SELECT buffers_checkpoint + buffers_clean + buffers_backend FROM pg_stat_bgwriter"
        )
        names = await conn.fetch(
            "SELECT c.relname, pg_total_relation_size(c.oid) AS size FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname = 'public'"
        )
        tables = {}
        for row in names:
            rows = await conn.fetchval(f'SELECT count(*) FROM "{row["relname"]}"')
            tables[row["relname"]] = (int(rows), int(row["size"]))
        return DbStats(int(wal["b"]), int(wal["wal_fpi"]), int(bg), tables)
    finally:
        await conn.close()


async def settle(url: str) -> None:
    """Does now the work a window's deliveries left for later, so that it
    falls inside the window: the merge of the search index's pending list
    (GIN "fast update", which a daemon's merger or the insert that overflows
    it would otherwise run at some later moment: ``messages_search_words``
    since schema step 20, ``messages_text_trgm`` before), then a CHECKPOINT,
    which writes every page dirtied so far."""
    conn = await asyncpg.connect(_dsn(url))
    try:
        for index in ("messages_search_words", "messages_text_trgm"):
            await conn.execute(
                "SELECT gin_clean_pending_list(i) FROM to_regclass($1) AS i WHERE i IS NOT NULL",
                index,
            )
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


@dataclass
class Snapshot:
    mtad_cpu: float
    pg_cpu: float
    mtad_written: int
    pg_written: int
    blobs: tuple[int, int, int]
    db: DbStats


async def snapshot(site: Site, mtad_pid: int, blob_dir: Path) -> Snapshot:
    return Snapshot(
        proc_cpu_seconds(mtad_pid),
        postgres_cpu_seconds(site.servers),
        io_write_bytes(mtad_pid),
        postgres_write_bytes(site),
        await asyncio.to_thread(folder_usage, blob_dir),
        await db_stats(site.urls["default"]),
    )


@dataclass
class DeliveryCost:
    """Per delivered message, one size."""

    size: int  # the messages' mean size in octets
    messages: int
    per_second: float
    mtad_cpu_ms: float
    pg_cpu_ms: float
    pg_written_bytes: float
    wal_bytes: float
    wal_fpi: float
    pg_buffers_written_bytes: float
    mtad_written_bytes: float
    blob_files: float
    blob_bytes: float
    blob_allocated_bytes: float
    db_bytes: float
    db_rows: dict[str, float]
    db_bytes_by_table: dict[str, float]
    loadavg: float


def delivery_cost(
    size: int, messages: int, elapsed: float, a: Snapshot, b: Snapshot
) -> DeliveryCost:
    """The per-message figures of the window between ``a`` and ``b``."""
    per = 1.0 / messages
    rows = {t: (b.db.tables[t][0] - a.db.tables.get(t, (0, 0))[0]) * per for t in b.db.tables}
    sizes = {t: (b.db.tables[t][1] - a.db.tables.get(t, (0, 0))[1]) * per for t in b.db.tables}
    return DeliveryCost(
        size=size,
        messages=messages,
        per_second=round(messages / elapsed, 1),
        mtad_cpu_ms=round(1000 * (b.mtad_cpu - a.mtad_cpu) * per, 3),
        pg_cpu_ms=round(1000 * (b.pg_cpu - a.pg_cpu) * per, 3),
        pg_written_bytes=round((b.pg_written - a.pg_written) * per),
        wal_bytes=round((b.db.wal_bytes - a.db.wal_bytes) * per),
        wal_fpi=round((b.db.wal_fpi - a.db.wal_fpi) * per, 2),
        pg_buffers_written_bytes=round(8192 * (b.db.buffers_written - a.db.buffers_written) * per),
        mtad_written_bytes=round((b.mtad_written - a.mtad_written) * per),
        blob_files=round((b.blobs[0] - a.blobs[0]) * per, 3),
        blob_bytes=round((b.blobs[1] - a.blobs[1]) * per),
        blob_allocated_bytes=round((b.blobs[2] - a.blobs[2]) * per),
        db_bytes=round(sum(sizes.values())),
        db_rows={t: round(v, 2) for t, v in rows.items() if v},
        db_bytes_by_table={t: round(v) for t, v in sizes.items() if v},
        loadavg=loadavg(),
    )


# --------------------------------------------------------------------- steps
@dataclass
class Results:
    started: str
    commit: str
    args: dict[str, object]
    delivery: list[DeliveryCost] = field(default_factory=list)
    imap: list[dict[str, object]] = field(default_factory=list)
    login: dict[str, float] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)
    idle_tls: dict[str, float] = field(default_factory=dict)


async def smtp_step(
    args: argparse.Namespace, site: Site, data_dir: Path, rcpts: list[str], out: Results
) -> None:
    dns = await asyncio.to_thread(start_dns_server, Zone())
    proc, port = await start_mtad(data_dir, site, args.sessions, dns.port)
    rng = random.Random(args.seed)
    words = Words(rng)
    try:
        for size in args.sizes:
            made: list[int] = []

            def make(n: int, rcpt: str, size: int = size, made: list[int] = made) -> bytes:
                raw = capacity_message(n, rcpt, size, rng, words)
                made.append(len(raw))
                return raw

            # Warm-up (imports, pools, first pages), not counted.
            await load(port, min(100, args.messages), 4, rcpts, make)
            made.clear()
            await settle(site.urls["default"])
            before = await snapshot(site, proc.pid, data_dir / "blobs")
            elapsed = await load(port, args.messages, args.sessions, rcpts, make)
            await asyncio.sleep(0.5)
            await settle(site.urls["default"])
            after = await snapshot(site, proc.pid, data_dir / "blobs")
            cost = delivery_cost(
                round(sum(made) / len(made)), args.messages, elapsed, before, after
            )
            out.delivery.append(cost)
            print(json.dumps(asdict(cost)), flush=True)
    finally:
        proc.terminate()
        await proc.wait()
        stop_dns_server(dns)


async def imap_step(
    args: argparse.Namespace, site: Site, data_dir: Path, rcpts: list[str], out: Results
) -> None:
    port = free_port()
    procs = start_imapd(data_dir, port, "WARNING", 1, site.overrides)
    imapd = procs[0].pid
    try:
        opts = argparse.Namespace(clients=len(rcpts), layout="accounts", size=5 * 1024)
        cpu0, pg0 = proc_cpu_seconds(imapd), postgres_cpu_seconds(site.servers)
        sessions = await open_sessions(port, rcpts, opts)
        # Connect, LOGIN (argon2id at the default cost), SELECT, UID SEARCH ALL and SEEN.
        out.login = {
            "sessions": len(sessions),
            "imapd_cpu_ms": round(1000 * (proc_cpu_seconds(imapd) - cpu0) / len(sessions), 1),
            "pg_cpu_ms": round(
                1000 * (postgres_cpu_seconds(site.servers) - pg0) / len(sessions), 2
            ),
            "loadavg": loadavg(),
        }
        print(json.dumps(out.login), flush=True)
        try:
            await run_phase("imapd/pg", "mixed", sessions, 2, lambda: 0.0)  # warm-up
            for phase in IMAP_PHASES:
                r = await run_phase(
                    "imapd/pg",
                    phase,
                    sessions,
                    args.seconds,
                    lambda: proc_cpu_seconds(imapd),
                    lambda: postgres_cpu_seconds(site.servers),
                )
                row = {
                    "phase": phase,
                    "per_second": r.per_second,
                    "imapd_cpu_ms": r.server_cpu_ms_per_cmd,
                    "pg_cpu_ms": r.database_cpu_ms_per_cmd,
                    "p50_ms": r.p50_ms,
                    "loadavg": r.loadavg,
                }
                out.imap.append(row)
                print(json.dumps(row), flush=True)
        finally:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    finally:
        for p in procs:
            stop_process(p)


# For the IDLE step only: hundreds of LOGINs at the default argon2id cost
# (~0.2 s of CPU each, measured above) would load the shared machine for
# minutes and measure nothing more. imapd rehashes each account's password
# to this cost at its first LOGIN there.
CHEAP_ARGON2 = [
    "auth.argon2_time_cost=1", "auth.argon2_memory_kib=64", "auth.argon2_parallelism=1"
]


def client_tls() -> ssl.SSLContext:
    """The bench's TLS client: imapd's certificate is the self-signed one it
    made in its data dir, so it is not verified (loopback only)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def idle_step(
    args: argparse.Namespace, site: Site, data_dir: Path, rcpts: list[str], tls: bool
) -> dict[str, float]:
    """``--idle`` connections opened one at a time, then left in IDLE, on an
    imapd of their own; with ``tls`` on its implicit-TLS port (RFC 8314)."""
    port, tls_port = free_port(), free_port()
    overrides = [
        *site.overrides, *CHEAP_ARGON2, "imap.max_connections_per_ip=0",
        f"imap.tls_listen=['127.0.0.1:{tls_port}']",
    ]
    procs = start_imapd(data_dir, port, "WARNING", 1, overrides)
    imapd = procs[0].pid
    context = client_tls() if tls else None
    port = tls_port if tls else port
    conns: list[IdleConnection] = []
    try:
        for rcpt in rcpts:  # the rehash, and imapd's first pages and pools
            conns.append(await open_idle(port, rcpt, context))
        await close_idle(conns)
        await asyncio.sleep(1.0)
        # At rest with no connection: PostgreSQL's own background work (WAL
        # writer, checkpointer, autovacuum, statistics), taken off the IDLE figure.
        rest0 = proc_cpu_seconds(imapd), postgres_cpu_seconds(site.servers)
        await asyncio.sleep(args.idle_seconds)
        rest = proc_cpu_seconds(imapd) - rest0[0], postgres_cpu_seconds(site.servers) - rest0[1]
        rss0, backends0 = rss_kib(imapd), pg_backends(site)
        cpu0, pg0 = proc_cpu_seconds(imapd), postgres_cpu_seconds(site.servers)
        for i in range(args.idle):
            conns.append(await open_idle(port, rcpts[i % len(rcpts)], context))
        cpu1, pg1 = proc_cpu_seconds(imapd), postgres_cpu_seconds(site.servers)
        await asyncio.sleep(args.idle_seconds)
        cpu2, pg2 = proc_cpu_seconds(imapd), postgres_cpu_seconds(site.servers)
        rss1, backends1 = rss_kib(imapd), pg_backends(site)
        exists = [c.exists for c in conns]
    finally:
        await close_idle(conns)
        for p in procs:
            stop_process(p)
    n, hour = args.idle, 3600 / args.idle_seconds
    figures = {
        "tls": int(tls),
        "connections": n,
        "mean_mailbox_messages": round(sum(exists) / n),
        "rss_kib_per_idle": round((rss1 - rss0) / n, 1),
        "imapd_rss_mib": round(rss1 / 1024, 1),
        "pg_backends_added": backends1 - backends0,
        # Connect (and the TLS handshake), LOGIN at CHEAP_ARGON2's cost, SELECT, IDLE.
        "open_imapd_cpu_ms_cheap_login": round(1000 * (cpu1 - cpu0) / n, 2),
        "open_pg_cpu_ms": round(1000 * (pg1 - pg0) / n, 2),
        "idle_imapd_cpu_ms_per_conn_hour": round(1000 * (cpu2 - cpu1 - rest[0]) / n * hour, 2),
        "idle_pg_cpu_ms_per_conn_hour": round(1000 * (pg2 - pg1 - rest[1]) / n * hour, 2),
        "rest_imapd_cpu_ms_per_s": round(1000 * rest[0] / args.idle_seconds, 2),
        "rest_pg_cpu_ms_per_s": round(1000 * rest[1] / args.idle_seconds, 2),
        "loadavg": loadavg(),
    }
    print(json.dumps(figures), flush=True)
    return figures


async def close_idle(conns: list[IdleConnection]) -> None:
    for conn in conns:
        conn.writer.close()
    conns.clear()


@dataclass
class IdleConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    exists: int  # messages in the INBOX it selected


async def open_idle(port: int, login: str, tls: ssl.SSLContext | None = None) -> IdleConnection:
    """A connection logged in, INBOX selected, in IDLE (RFC 2177: the server
    answers the command with a continuation request and then waits)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    await reader.readline()  # greeting
    exists = 0
    for tag, line in ((b"a", b'LOGIN "%s" "%s"' % (login.encode(), PASSWORD.encode())),
                      (b"b", b"SELECT INBOX")):
        writer.write(tag + b" " + line + b"\r\n")
        while not (reply := await reader.readline()).startswith(tag + b" "):
            if not reply:
                raise ConnectionError(f"{login}: closed during {line!r}")
            if reply.endswith(b" EXISTS\r\n"):  # RFC 3501 section 7.3.1
                exists = int(reply.split()[1])
        if not reply.startswith(tag + b" OK"):
            raise RuntimeError(f"{login}: {line!r} -> {reply!r}")
    writer.write(b"c IDLE\r\n")
    while not (reply := await reader.readline()).startswith(b"+"):
        if not reply:
            raise ConnectionError(f"{login}: closed before IDLE's continuation")
    return IdleConnection(reader, writer, exists)


def pg_backends(site: Site) -> int:
    """Live postgres processes (connections and background workers)."""
    return sum(len(process_tree(s.proc.pid)) - 1 for s in site.servers)


def head_commit() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
            capture_output=True, text=True,
        ).stdout.strip()
    return "unknown"


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="capacity-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500, help="per size")
    parser.add_argument(
        "--sizes", type=lambda s: [int(n) for n in s.split(",")], default=[5120, 51200]
    )
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--accounts", type=int, default=20, help="also the IMAP sessions")
    parser.add_argument("--seconds", type=float, default=8.0, help="per IMAP phase")
    parser.add_argument("--idle", type=int, default=200, help="IDLE connections")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--json", help="write every figure to this file too")
    parser.add_argument(
        "--steps", type=lambda s: s.split(","), default=["smtp", "imap", "idle"],
        help="which of smtp, imap, idle to run (imap and idle read the mail smtp delivers)",
    )
    args = parser.parse_args()
    out = Results(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), head_commit(), vars(args))
    site = await start_site(1)
    try:
        with workdir() as tmp:
            data_dir = tmp / "data"
            rcpts = await make_accounts(site, data_dir, args.accounts, PASSWORD)
            await smtp_step(args, site, data_dir, rcpts, out)
            if "imap" in args.steps:
                await imap_step(args, site, data_dir, rcpts, out)
            if "idle" in args.steps:
                out.idle = await idle_step(args, site, data_dir, rcpts, tls=False)
                out.idle_tls = await idle_step(args, site, data_dir, rcpts, tls=True)
    finally:
        stop_site(site)
    if args.json:
        text = json.dumps(asdict(out), indent=2) + "\n"
        await asyncio.to_thread(Path(args.json).write_text, text)


if __name__ == "__main__":
    asyncio.run(main())
