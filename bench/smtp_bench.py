"""SMTP inbound throughput: 5 KB messages over 20 parallel sessions.

Starts mtad as its own process (``python -m mtad``) on a fresh data dir with
one local account, or drives an already running server (``--port``, with
``--pid`` to measure its CPU). ``--processes N`` starts N mtad processes
sharing the port (SO_REUSEPORT) and the SQLite database, the multi-process
deployment on one host. Reports messages/s, server CPU per message (utime +
stime from /proc, all server processes) and the client's own CPU per message
(it shares the machine). Never part of the test run.

    python bench/smtp_bench.py --messages 2000 --sessions 20
    python bench/smtp_bench.py --messages 2000 --sessions 20 --processes 2
    python bench/smtp_bench.py --port 2525 --pid 1234 --rcpt user@example.net
    python bench/smtp_bench.py --messages 2000 --sessions 20 --compare-postfix --smtp-source
    python bench/smtp_bench.py --messages 2000 --sessions 20 --backend sqlite,postgresql
    python bench/smtp_bench.py --messages 2000 --sessions 20 --backend sqlite,postgresql \
        --text varied

``--compare-postfix`` then runs the same load against Postfix delivering to
Dovecot over LMTP (bench/postfix_lmtp_peer.py). Postfix acknowledges at
queue time, so it reports both "accepted/s" (until the last 250) and
"delivered into mailboxes/s" (until the last message is in Dovecot's
Maildir); shardmail stores into the mailbox before its 250, so for it the
two are the same figure. ``--smtp-source`` adds a run with Postfix's C
client ``smtp-source`` (same count, size and sessions, one connection per
session) against each server, when /usr/sbin/smtp-source exists.

``--backend sqlite,postgresql`` runs the load on each storage in turn, in
the same run, each mtad on a fresh data dir; on PostgreSQL (a durable
server the bench starts, see ``bench/storage_backend.py``, or
``--storage-url``) it also reports the database server's CPU per message.

``--text varied``: each body is different text of real words (those of the
repository's Markdown files, drawn Zipf-weighted as a language's words are)
instead of one sentence repeated, so full-text indexes pay what real mail
costs them (one sentence has about 50 distinct trigrams, 5 KB of varied
words hundreds to thousands).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import os
import random
import re
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.storage_backend import (  # noqa: E402
    BenchStorage,
    add_storage_options,
    bench_storage,
    check_backends,
)
from runtime.daemon import add_override_option  # noqa: E402
from tests.dnsserver import Zone, start_dns_server, stop_dns_server  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children are not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# Body text: "repeated" (one sentence) or "varied" (see varied_text).
TEXTS = ("repeated", "varied")


@functools.cache
def _doc_words() -> tuple[list[str], list[float]]:
    """The distinct words of the repository's Markdown files, in a fixed
    random order, with cumulative Zipf weights (the n-th word 1/n)."""
    found: set[str] = set()
    for path in sorted(REPO.rglob("*.md")):
        if ".venv" not in path.parts:
            found.update(re.findall(r"[A-Za-z][a-z]+", path.read_text(errors="replace")))
    words = sorted(found)
    random.Random(1).shuffle(words)
    return words, list(itertools.accumulate(1 / (i + 1) for i in range(len(words))))


def varied_text(size: int, n: int) -> bytes:
    """About ``size`` bytes of words for message ``n`` (the same for the same
    ``n``), in CRLF lines of under 78 characters (RFC 5322 section 2.1.1)."""
    words, weights = _doc_words()
    drawn = random.Random(n).choices(words, cum_weights=weights, k=max(1, size // 6))
    lines, line, total = [], "", 0
    for word in drawn:
        if len(line) + len(word) >= 76:
            lines.append(line)
            total += len(line) + 2
            line = ""
            if total >= size:
                break
        line = f"{line} {word}" if line else word
    if line and total < size:
        lines.append(line)
    return "".join(f"{line}\r\n" for line in lines).encode()


def make_message(size: int, n: int, rcpt: str, text: str = "repeated") -> bytes:
    header = (
        f"From: bench@sender.example\r\nTo: {rcpt}\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench-{n}-{time.time_ns()}@sender.example>\r\n\r\n"
    ).encode()
    if text == "varied":
        return header + varied_text(max(1, size - len(header)), n)
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = line * max(1, (size - len(header)) // len(line))
    return header + body


async def session(
    port: int, count: int, size: int, rcpt: str, offset: int, text: str = "repeated"
) -> int:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=60,
        local_hostname="bench.example",
    )
    await client.connect()
    await client.ehlo()
    sent = 0
    for i in range(count):
        message = make_message(size, offset + i, rcpt, text)
        await client.sendmail("bench@sender.example", [rcpt], message)
        sent += 1
    await client.quit()
    return sent


async def run_load(
    port: int, messages: int, sessions: int, size: int, rcpt: str, text: str = "repeated"
) -> float:
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    start = time.perf_counter()
    offsets = [sum(per[:i]) for i in range(sessions)]
    done = await asyncio.gather(
        *(session(port, n, size, rcpt, off, text) for n, off in zip(per, offsets, strict=True))
    )
    elapsed = time.perf_counter() - start
    assert sum(done) == messages
    return elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def prepare(data_dir: Path, rcpt: str, overrides: list[str]) -> None:
    from conf.settings import load_settings
    from storage import open_storage

    settings = load_settings(overrides=[f"server.data_dir='{data_dir}'", *overrides])
    os.makedirs(data_dir, exist_ok=True)
    store = await open_storage(settings.storage)
    try:
        await store.directory.add_domain(rcpt.rpartition("@")[2])
        await store.directory.add_account(rcpt, "bench-password")
    finally:
        await store.close()


@dataclass
class Run:
    """One run's figures: wall time and CPU seconds of the servers."""

    backend: str
    elapsed: float
    cpu: float  # every mtad process
    client: float
    database_cpu: float | None  # the PostgreSQL server's, when the bench started it
    pids: list[int]
    source: tuple[float, float] | None = None  # smtp-source: wall time, mtad CPU


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """The load's options (``--messages``, ``--sessions``, ``--size``,
    ``--rcpt``, ``--text``), shared with the benches that run this load."""
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5 * 1024)
    parser.add_argument("--rcpt", default="user@bench.example")
    parser.add_argument(
        "--text",
        choices=TEXTS,
        default="repeated",
        help="message bodies: one sentence repeated, or varied real words (see above)",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_options(parser)
    parser.add_argument("--port", type=int, help="bench a running server instead")
    parser.add_argument("--pid", type=int, help="server pid, for CPU accounting")
    parser.add_argument("--checks", action="store_true", help="keep SPF/DKIM checks on")
    parser.add_argument(
        "--processes", type=int, default=1, help="mtad processes sharing the port (SO_REUSEPORT)"
    )
    parser.add_argument(
        "--compare-postfix",
        action="store_true",
        help="then the same load against Postfix delivering to Dovecot over LMTP",
    )
    add_override_option(
        parser, "a setting for the mtad processes (repeatable), e.g. smtp.spf=true"
    )
    parser.add_argument(
        "--smtp-source",
        action="store_true",
        help="also drive each server with Postfix's smtp-source, if installed",
    )
    add_storage_options(parser)
    args = parser.parse_args()
    check_backends(parser, args)
    smtp_source = shutil.which("smtp-source", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if args.smtp_source and smtp_source is None:
        print("smtp-source not found (apt-get install -y postfix); skipping that client")
    if not args.smtp_source:
        smtp_source = None
    if args.port is not None:
        runs = [await measure(args, args.port, [args.pid] if args.pid else [], smtp_source)]
        await report(args, runs)
        return
    runs = []
    tmps: list[Path] = []
    try:
        for backend in args.backend:
            async with bench_storage(backend, args.storage_url) as store:
                tmp = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
                tmps.append(tmp)
                runs.append(await run_backend(args, store, tmp, smtp_source))
        await report(args, runs)
    finally:
        # Removed only now: thousands of just-deleted inodes make ext4's
        # inode allocator scan (recently_deleted) and would tax whichever
        # server runs next; see bench/README.md.
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)


def mtad_argv(data_dir: Path, port: int, dns_port: int, sessions: int, spf_dkim: bool) -> list[str]:
    """The command line of an mtad for a bench: its MX on 127.0.0.1:``port``
    (submission ports free and unused), ``data_dir``, no rate limit, room
    for ``sessions`` connections from one address, DNS from the dnsmasq on
    ``dns_port``; SPF and DKIM checks only with ``spf_dkim``."""
    submission, submissions = free_port(), free_port()
    argv = [
        sys.executable, "-m", "mtad",
        "-o", f"server.data_dir='{data_dir}'",
        "-o", "server.log_level='WARNING'",
        "-o", f"smtp.mx_listen=['127.0.0.1:{port}']",
        "-o", f"smtp.submission_listen=['127.0.0.1:{submission}']",
        "-o", f"smtp.submissions_listen=['127.0.0.1:{submissions}']",
        "-o", "smtp.rate_limit_per_ip=0",
        "-o", "dns.nameservers=['127.0.0.1']",
        "-o", f"dns.port={dns_port}",
        "-o", f"smtp.max_connections_per_ip={sessions + 5}",
    ]  # fmt: skip
    if not spf_dkim:
        argv += ["-o", "smtp.spf=false", "-o", "smtp.dkim_verify=false"]
    return argv


async def run_backend(
    args: argparse.Namespace, store: BenchStorage, tmp: Path, smtp_source: str | None
) -> Run:
    """Starts mtad on ``store`` with a fresh data dir in ``tmp``, runs the
    load, stops mtad; the database server's CPU is counted over the load."""
    await prepare(tmp / "data", args.rcpt, store.overrides)
    port = free_port()
    # DMARC (and SPF/DKIM with --checks) resolve through an empty-zone
    # dnsmasq on loopback: every name is NXDOMAIN, nothing leaves the host.
    dns = await asyncio.to_thread(start_dns_server, Zone())
    argv = mtad_argv(tmp / "data", port, dns.port, args.sessions, spf_dkim=args.checks)
    for override in [*store.overrides, *args.overrides]:
        argv += ["-o", override]
    procs: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(args.processes):
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, stderr=asyncio.subprocess.PIPE
            )
            procs.append(proc)
            await wait_ready(proc)
        db_before = store.cpu_seconds()
        run = await measure(args, port, [p.pid for p in procs], smtp_source)
        run.backend = store.backend
        await store.settle()  # the deferred index merge counts as the load's
        if store.server_pids:
            run.database_cpu = store.cpu_seconds() - db_before
        return run
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()
        stop_dns_server(dns)


async def measure(
    args: argparse.Namespace, port: int, pids: list[int], smtp_source: str | None
) -> Run:
    """The load against a running server (the aiosmtplib client, then
    smtp-source if given) and the servers' CPU over each."""
    # A short warm-up so imports and first connections do not count.
    await run_load(
        port, min(40, args.messages), min(4, args.sessions), args.size, args.rcpt, args.text
    )
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    client_before = client_cpu_seconds()
    elapsed = await run_load(port, args.messages, args.sessions, args.size, args.rcpt, args.text)
    client = client_cpu_seconds() - client_before
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
    run = Run("", elapsed, cpu, client, None, pids)
    if smtp_source is not None:
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        source_elapsed = await run_smtp_source(smtp_source, port, args)
        run.source = (source_elapsed, sum(cpu_seconds(pid) for pid in pids) - cpu_before)
    return run


async def report(args: argparse.Namespace, runs: list[Run]) -> None:
    """Prints each run's figures, the backends side by side, then runs and
    prints the Postfix comparison (against the first run)."""
    n = args.messages
    for run in runs:
        if run.backend:
            print(f"\n== shardmail on {run.backend} ==")
        print(f"messages:      {n} x {args.size} bytes, {args.sessions} sessions")
        print(f"elapsed:       {run.elapsed:.2f} s")
        print(f"throughput:    {n / run.elapsed:.1f} messages/s")
        if run.pids:
            print(
                f"server CPU:    {run.cpu:.2f} s ({1000 * run.cpu / n:.2f} ms per message, "
                f"{len(run.pids)} process{'es' if len(run.pids) > 1 else ''})"
            )
        if run.database_cpu is not None:
            print(
                f"database CPU:  {run.database_cpu:.2f} s "
                f"({1000 * run.database_cpu / n:.2f} ms per message, PostgreSQL)"
            )
        print(f"client CPU:    {run.client:.2f} s ({1000 * run.client / n:.2f} ms per message)")
        if run.source is not None:
            print(
                f"smtp-source:   {n / run.source[0]:.1f} messages/s ({run.source[0]:.2f} s), "
                f"server CPU {1000 * run.source[1] / n:.2f} ms per message"
            )
    if len(runs) > 1:
        base = runs[0]
        print(f"\n== against {base.backend} (same run) ==")
        for run in runs[1:]:
            print(
                f"{run.backend}: {base.elapsed / run.elapsed:.2f}x the messages/s, "
                f"{run.cpu / base.cpu:.2f}x the mtad CPU per message"
            )
    if args.compare_postfix:
        run = runs[0]
        print("\n== Postfix -> LMTP -> Dovecot (same load) ==", flush=True)
        reference, reference_cpu, reference_source = await compare_postfix(
            args, shutil.which("smtp-source", path="/usr/sbin") if run.source else None
        )
        mine = n / run.elapsed
        print(
            f"\nratio:         shardmail {mine:.1f} / Postfix+Dovecot delivered "
            f"{reference:.1f} messages/s = {mine / reference:.2f}x"
        )
        if run.source is not None and reference_source is not None:
            mine_source = n / run.source[0]
            print(
                f"smtp-source:   shardmail {mine_source:.1f} / Postfix+Dovecot delivered "
                f"{reference_source:.1f} messages/s = {mine_source / reference_source:.2f}x"
            )
        if run.pids:
            print(
                f"CPU/message:   shardmail {1000 * run.cpu / n:.2f} ms / Postfix+Dovecot "
                f"{1000 * reference_cpu / n:.2f} ms"
            )


async def run_smtp_source(binary: str, port: int, args: argparse.Namespace) -> float:
    """Wall time of one ``smtp-source`` run: ``-s`` sessions in parallel, each
    keeping its connection (``-d``) for its share of ``-m`` messages of
    ``-l`` bytes of payload."""
    argv = [
        binary, "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size), "-d",
        "-f", "bench@sender.example", "-t", args.rcpt, f"127.0.0.1:{port}",
    ]
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"smtp-source failed ({proc.returncode}): {out.decode(errors='replace')}")
    return elapsed


async def compare_postfix(
    args: argparse.Namespace, smtp_source: str | None
) -> tuple[float, float, float | None]:
    """The same client load against Postfix handing mail to Dovecot over LMTP;
    prints accepted/s, delivered-into-Maildir/s and the CPU per message of
    every Postfix and Dovecot process; returns (delivered messages/s, server
    CPU seconds) of the main client run and the delivered messages/s of the
    smtp-source run (None without it)."""
    from bench.postfix_lmtp_peer import PostfixLmtpPeer

    peer = PostfixLmtpPeer(args.rcpt.rpartition("@")[2])
    peer.add_user(args.rcpt)
    await asyncio.to_thread(peer.start)
    try:
        warm = min(40, args.messages)
        await run_load(peer.port, warm, min(4, args.sessions), args.size, args.rcpt)
        await asyncio.to_thread(peer.wait_delivered, args.rcpt, warm)
        base = peer.delivered(args.rcpt)
        cpu_before = peer.cpu_seconds()
        client_before = client_cpu_seconds()
        start = time.perf_counter()
        accepted = await run_load(peer.port, args.messages, args.sessions, args.size, args.rcpt)
        client = client_cpu_seconds() - client_before
        done = await asyncio.to_thread(peer.wait_delivered, args.rcpt, base + args.messages)
        delivered = done - start
        await asyncio.sleep(0.2)  # lmtp/qmgr bookkeeping after the last rename
        cpu = peer.cpu_seconds() - cpu_before
        source: tuple[float, float, float] | None = None
        if smtp_source is not None:
            base = peer.delivered(args.rcpt)
            cpu_before = peer.cpu_seconds()
            start = time.perf_counter()
            source_accepted = await run_smtp_source(smtp_source, peer.port, args)
            done = await asyncio.to_thread(peer.wait_delivered, args.rcpt, base + args.messages)
            await asyncio.sleep(0.2)
            source = (source_accepted, done - start, peer.cpu_seconds() - cpu_before)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(peer.stop)
    print(f"messages:      {args.messages} x {args.size} bytes, {args.sessions} sessions")
    print(f"accepted:      {accepted:.2f} s, {args.messages / accepted:.1f} messages/s")
    print(
        f"delivered:     {delivered:.2f} s, {args.messages / delivered:.1f} messages/s "
        "(into Dovecot's Maildir)"
    )
    print(
        f"server CPU:    {cpu:.2f} s ({1000 * cpu / args.messages:.2f} ms per message, "
        "all Postfix and Dovecot processes)"
    )
    print(f"client CPU:    {client:.2f} s ({1000 * client / args.messages:.2f} ms per message)")
    if source is not None:
        print(
            f"smtp-source:   accepted {args.messages / source[0]:.1f} messages/s, delivered "
            f"{args.messages / source[1]:.1f} messages/s ({source[1]:.2f} s), "
            f"server CPU {1000 * source[2] / args.messages:.2f} ms per message"
        )
    return args.messages / delivered, cpu, None if source is None else args.messages / source[1]


async def wait_ready(proc: asyncio.subprocess.Process) -> None:
    """Until the daemon says it is ready (each of several sharing a port)."""
    assert proc.stderr is not None
    while line := await asyncio.wait_for(proc.stderr.readline(), 60):
        sys.stderr.write(line.decode(errors="replace"))
        if line.startswith(b"shardmail ready"):
            asyncio.get_running_loop().create_task(drain(proc.stderr))
            return
    raise SystemExit("mtad did not start")


async def drain(stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stderr.write(line.decode(errors="replace"))


if __name__ == "__main__":
    asyncio.run(main())
