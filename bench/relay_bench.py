"""Outbound relay throughput: submission on 587 to delivery at a sink peer.

Starts a dnsmasq (MX of sink.bench -> 127.0.0.9), an asyncio sink SMTP
server on 127.0.0.9 (tests/integration/outbound/sink.py) and mtad as its
own process (``python -m mtad``) with queue workers and, unless
``--no-dkim``, a DKIM key for the sender's domain. Messages are submitted
(AUTH PLAIN, plaintext allowed for the bench) over parallel sessions; the
clock runs from the first submission until the sink holds every message.
Reports messages/s end to end and the mtad CPU per message. Never part of
the test run; everything stays on 127.0.0.0/8.

    python bench/relay_bench.py --messages 1000 --sessions 10 --workers 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.smtp_bench import cpu_seconds, make_message  # noqa: E402

SINK_IP = "127.0.0.9"
SENDER = "bench@relay.example"
PASSWORD = "bench-password"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def prepare(data_dir: Path, dkim: bool) -> None:
    from argon2 import PasswordHasher
    from argon2.profiles import CHEAPEST

    from mtad.outbound.signing import generate_key
    from storage import open_storage_from_url

    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    store = await open_storage_from_url(
        f"sqlite+aiosqlite:///{data_dir / 'shardmail.db'}",
        data_dir / "blobs",
        password_hasher=PasswordHasher.from_parameters(CHEAPEST),
    )
    try:
        await store.directory.add_domain("relay.example")
        await store.directory.add_account(SENDER, PASSWORD)
    finally:
        await store.close()
    if dkim:
        generate_key(data_dir / "dkim", "relay.example", "shardmail")


async def submit(port: int, count: int, size: int, rcpt: str, offset: int) -> int:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
    await client.connect()
    await client.ehlo()
    await client.login(SENDER, PASSWORD)
    for i in range(count):
        # Submission takes only a From: the user owns (mtad/session.py).
        message = make_message(size, offset + i, rcpt).replace(
            b"From: bench@sender.example", f"From: {SENDER}".encode(), 1
        )
        await client.sendmail(SENDER, [rcpt], message)
    await client.quit()
    return count


async def wait_for_count(sink, count: int, timeout: float) -> None:
    """Until the sink holds ``count`` messages or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(sink.received) >= count:
            return
        await asyncio.sleep(0.05)


async def main() -> None:
    from tests.dnsserver import Zone, dns_server
    from tests.integration.outbound.sink import SinkServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=5 * 1024)
    parser.add_argument("--workers", type=int, default=16, help="queue.workers")
    parser.add_argument("--per-domain", type=int, default=16, help="per_domain_concurrency")
    parser.add_argument("--no-dkim", action="store_true", help="do not sign")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    data_dir = tmp / "data"
    await prepare(data_dir, not args.no_dkim)
    relay_port = free_port(SINK_IP)
    submission = free_port()
    zone = Zone().a("mx.sink.bench", SINK_IP).mx("sink.bench", "mx.sink.bench", 10)
    proc = None
    async with dns_server(zone) as dns, SinkServer(SINK_IP, relay_port) as sink:
        argv = [
            sys.executable,
            "-m",
            "mtad",
            "-o",
            f"server.data_dir='{data_dir}'",
            "-o",
            "server.log_level='WARNING'",
            "-o",
            f"smtp.mx_listen=['127.0.0.1:{free_port()}']",
            "-o",
            f"smtp.submission_listen=['127.0.0.1:{submission}']",
            "-o",
            f"smtp.submissions_listen=['127.0.0.1:{free_port()}']",
            "-o",
            "smtp.rate_limit_per_ip=0",
            "-o",
            "smtp.rate_limit_per_user=0",
            # One account sends every message: its sending limits ([limits]) off.
            *(a for k in ("messages", "recipients") for w in ("hour", "day")
              for a in ("-o", f"limits.user_{k}_per_{w}=0")),
            "-o",
            "smtp.save_sent_copy=false",
            "-o",
            f"smtp.max_connections_per_ip={args.sessions + 5}",
            "-o",
            "auth.allow_plaintext=true",
            "-o",
            "dns.nameservers=['127.0.0.1']",
            "-o",
            f"dns.port={dns.port}",
            "-o",
            f"queue.workers={args.workers}",
            "-o",
            f"queue.per_domain_concurrency={args.per_domain}",
            "-o",
            f"queue.smtp_port={relay_port}",
            "-o",
            "queue.poll_interval_seconds=0.2",
        ]
        proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO)
        try:
            for _ in range(300):
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", submission)
                    writer.close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            else:
                raise SystemExit("mtad did not start")
            rcpt = "sink@sink.bench"
            per = [
                args.messages // args.sessions + (1 if i < args.messages % args.sessions else 0)
                for i in range(args.sessions)
            ]
            offsets = [sum(per[:i]) for i in range(args.sessions)]
            cpu_before = cpu_seconds(proc.pid)
            start = time.perf_counter()
            await asyncio.gather(
                *(
                    submit(submission, n, args.size, rcpt, o)
                    for n, o in zip(per, offsets, strict=True)
                )
            )
            submitted = time.perf_counter() - start
            await wait_for_count(sink, args.messages, timeout=600)
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds(proc.pid) - cpu_before
        finally:
            proc.terminate()
            await proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)
    delivered = len(sink.received)
    signed = sum(r.data.startswith(b"DKIM-Signature:") for r in sink.received)
    print(f"messages:      {args.messages} x {args.size} bytes, {args.sessions} sessions")
    print(f"workers:       {args.workers} (per domain {args.per_domain}), DKIM signed {signed}")
    print(f"submitted in:  {submitted:.2f} s ({args.messages / submitted:.1f} messages/s)")
    print(f"delivered:     {delivered} in {elapsed:.2f} s")
    print(f"throughput:    {delivered / elapsed:.1f} messages/s submission -> sink")
    print(f"mtad CPU:      {cpu:.2f} s ({1000 * cpu / max(delivered, 1):.2f} ms per message)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
