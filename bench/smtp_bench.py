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

``--compare-postfix`` then runs the same load against Postfix delivering to
Dovecot over LMTP (bench/postfix_lmtp_peer.py). Postfix acknowledges at
queue time, so it reports both "accepted/s" (until the last 250) and
"delivered into mailboxes/s" (until the last message is in Dovecot's
Maildir); shardmail stores into the mailbox before its 250, so for it the
two are the same figure. ``--smtp-source`` adds a run with Postfix's C
client ``smtp-source`` (same count, size and sessions, one connection per
session) against each server, when /usr/sbin/smtp-source exists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def make_message(size: int, n: int, rcpt: str) -> bytes:
    header = (
        f"From: bench@sender.example\r\nTo: {rcpt}\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench-{n}-{time.time_ns()}@sender.example>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = line * max(1, (size - len(header)) // len(line))
    return header + body


async def session(port: int, count: int, size: int, rcpt: str, offset: int) -> int:
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=60,
        local_hostname="bench.example",
    )
    await client.connect()
    await client.ehlo()
    sent = 0
    for i in range(count):
        await client.sendmail("bench@sender.example", [rcpt], make_message(size, offset + i, rcpt))
        sent += 1
    await client.quit()
    return sent


async def run_load(port: int, messages: int, sessions: int, size: int, rcpt: str) -> float:
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    start = time.perf_counter()
    offsets = [sum(per[:i]) for i in range(sessions)]
    done = await asyncio.gather(
        *(session(port, n, size, rcpt, off) for n, off in zip(per, offsets, strict=True))
    )
    elapsed = time.perf_counter() - start
    assert sum(done) == messages
    return elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def prepare(data_dir: Path, rcpt: str) -> None:
    from conf.settings import load_settings
    from storage import open_storage

    settings = load_settings(overrides=[f"server.data_dir='{data_dir}'"])
    os.makedirs(data_dir, exist_ok=True)
    store = await open_storage(settings.storage)
    try:
        await store.directory.add_domain(rcpt.rpartition("@")[2])
        await store.directory.add_account(rcpt, "bench-password")
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5 * 1024)
    parser.add_argument("--rcpt", default="user@bench.example")
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
    args = parser.parse_args()
    smtp_source = shutil.which("smtp-source", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if args.smtp_source and smtp_source is None:
        print("smtp-source not found (apt-get install -y postfix); skipping that client")

    procs: list[asyncio.subprocess.Process] = []
    dns = None
    tmp = None
    port = args.port
    pids = [args.pid] if args.pid else []
    source: tuple[float, float] | None = None
    if port is None:
        tmp = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
        await prepare(tmp / "data", args.rcpt)
        port = free_port()
        submission, submissions = free_port(), free_port()
        # DMARC (and SPF/DKIM with --checks) resolve through an empty-zone
        # dnsmasq on loopback: every name is NXDOMAIN, nothing leaves the host.
        dns = await asyncio.to_thread(start_dns_server, Zone())
        argv = [
            sys.executable, "-m", "mtad",
            "-o", f"server.data_dir='{tmp / 'data'}'",
            "-o", "server.log_level='WARNING'",
            "-o", f"smtp.mx_listen=['127.0.0.1:{port}']",
            "-o", f"smtp.submission_listen=['127.0.0.1:{submission}']",
            "-o", f"smtp.submissions_listen=['127.0.0.1:{submissions}']",
            "-o", "smtp.rate_limit_per_ip=0",
            "-o", "dns.nameservers=['127.0.0.1']",
            "-o", f"dns.port={dns.port}",
            "-o", f"smtp.max_connections_per_ip={args.sessions + 5}",
        ]
        if not args.checks:
            argv += ["-o", "smtp.spf=false", "-o", "smtp.dkim_verify=false"]
        for override in args.overrides:
            argv += ["-o", override]
        for _ in range(args.processes):
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, stderr=asyncio.subprocess.PIPE
            )
            procs.append(proc)
            await wait_ready(proc)
        pids = [p.pid for p in procs]
    try:
        # A short warm-up so imports and first connections do not count.
        await run_load(port, min(40, args.messages), min(4, args.sessions), args.size, args.rcpt)
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        client_before = client_cpu_seconds()
        elapsed = await run_load(port, args.messages, args.sessions, args.size, args.rcpt)
        client = client_cpu_seconds() - client_before
        cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        if args.smtp_source and smtp_source is not None:
            cpu_before = sum(cpu_seconds(pid) for pid in pids)
            source_elapsed = await run_smtp_source(smtp_source, port, args)
            source = (source_elapsed, sum(cpu_seconds(pid) for pid in pids) - cpu_before)
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()
        if dns is not None:
            stop_dns_server(dns)
    try:
        await report(args, elapsed, cpu, client, pids, source, smtp_source)
    finally:
        # Removed only now: thousands of just-deleted inodes make ext4's
        # inode allocator scan (recently_deleted) and would tax whichever
        # server runs next; see bench/README.md.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


async def report(
    args: argparse.Namespace,
    elapsed: float,
    cpu: float,
    client: float,
    pids: list[int],
    source: tuple[float, float] | None,
    smtp_source: str | None,
) -> None:
    """Prints shardmail's figures, then runs and prints the Postfix comparison."""
    print(f"messages:      {args.messages} x {args.size} bytes, {args.sessions} sessions")
    print(f"elapsed:       {elapsed:.2f} s")
    print(f"throughput:    {args.messages / elapsed:.1f} messages/s")
    if pids:
        print(
            f"server CPU:    {cpu:.2f} s ({1000 * cpu / args.messages:.2f} ms per message, "
            f"{len(pids)} process{'es' if len(pids) > 1 else ''})"
        )
    print(f"client CPU:    {client:.2f} s ({1000 * client / args.messages:.2f} ms per message)")
    if source is not None:
        print(
            f"smtp-source:   {args.messages / source[0]:.1f} messages/s "
            f"({source[0]:.2f} s), server CPU {1000 * source[1] / args.messages:.2f} ms per message"
        )
    if args.compare_postfix:
        print("\n== Postfix -> LMTP -> Dovecot (same load) ==", flush=True)
        reference, reference_cpu, reference_source = await compare_postfix(
            args, smtp_source if args.smtp_source else None
        )
        mine = args.messages / elapsed
        print(
            f"\nratio:         shardmail {mine:.1f} / Postfix+Dovecot delivered "
            f"{reference:.1f} messages/s = {mine / reference:.2f}x"
        )
        if source is not None and reference_source is not None:
            mine_source = args.messages / source[0]
            print(
                f"smtp-source:   shardmail {mine_source:.1f} / Postfix+Dovecot delivered "
                f"{reference_source:.1f} messages/s = {mine_source / reference_source:.2f}x"
            )
        if pids:
            print(
                f"CPU/message:   shardmail {1000 * cpu / args.messages:.2f} ms / Postfix+Dovecot "
                f"{1000 * reference_cpu / args.messages:.2f} ms"
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
