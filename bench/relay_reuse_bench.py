"""Outbound delivery alone: queued mail to a sink peer, relay CPU per message.

relay_bench.py times submission and delivery together in one mtad (its
throughput follows the submission sessions); this one times the queue
workers only (issue #23, session reuse). ``--messages`` messages of random
sizes are queued first, then a QueueRunner in this process delivers them,
found by MX in a dnsmasq on loopback, to a sink SMTP server in a child
process (its CPU is not counted). The clock and this process's CPU run from
the runner's start until the queue is empty. ``--tls``: the sink offers
STARTTLS (a throwaway CA; opportunistic TLS, as to most MX hosts). The
code under test is whichever tree ``PYTHONPATH`` puts first (A/B against a
baseline checkout); ``--cache-seconds`` sets queue.connection_cache_seconds
where the tree has it. DKIM off (relay_bench.py covers signing). Loopback only.

    python bench/relay_reuse_bench.py --messages 600 --workers 16 --tls
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after PYTHONPATH: the tree under test comes first

SINK_IP = "127.0.0.9"
SENDER = "bench@relay.example"
RCPT = "sink@sink.bench"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def message(rng: random.Random, n: int) -> bytes:
    size = rng.randint(1_000, 20_000)
    line = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz .", k=76))
    body = (line + "\r\n") * (size // 78 + 1)
    return (
        f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: relay {n}\r\n"
        f"Date: Mon, 07 Dec 2026 00:00:00 +0000\r\n"
        f"Message-ID: <relay-{n}-{rng.getrandbits(48):x}@relay.example>\r\n\r\n{body}"
    ).encode()


async def sink_child(port: int, tls: bool, chunking: bool = False) -> None:
    """The peer: a sink on SINK_IP:port; "ready" on stdout, then on stdin's
    end its counts "received connections"."""
    import ssl

    from tests.integration.outbound.sink import SinkServer

    context = None
    if tls:
        import trustme

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("mx.sink.bench").configure_cert(context)
    server = SinkServer(SINK_IP, port, tls=context)
    if chunking:  # RFC 3030: the relay sends BDAT, not DATA
        server.extensions = [*server.extensions, "CHUNKING"]
    async with server as sink:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        print(len(sink.received), sink.connections, flush=True)


async def main() -> None:
    from argon2 import PasswordHasher
    from argon2.profiles import CHEAPEST

    from conf.settings import Settings
    from mtad.dns import Resolver
    from mtad.outbound.worker import QueueRunner
    from storage import open_storage_from_url
    from tests.dnsserver import Zone, dns_server
    from tests.ports import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--per-domain", type=int, default=16)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--chunking", action="store_true", help="the sink offers CHUNKING")
    parser.add_argument("--cache-seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=23)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="relay-reuse-bench-"))
    port = free_port((SINK_IP,))
    zone = Zone().a("mx.sink.bench", SINK_IP).mx("sink.bench", "mx.sink.bench", 10)
    sink = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--sink-child",
        str(port),
        *(["--tls"] if args.tls else []),
        *(["--chunking"] if args.chunking else []),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"},
    )
    assert sink.stdout is not None and sink.stdin is not None
    if (await sink.stdout.readline()).strip() != b"ready":
        raise SystemExit("sink did not start")
    try:
        with dns_server(zone) as dns:
            queue: dict[str, object] = {
                "workers": args.workers,
                "per_domain_concurrency": args.per_domain,
                "smtp_port": port,
                "poll_interval_seconds": 0.2,
                "delay_warning_seconds": 0,
                "dkim_key_dir": str(tmp / "no-keys"),
            }
            if args.cache_seconds is not None:
                queue["connection_cache_seconds"] = args.cache_seconds
            settings = Settings.model_validate(
                {
                    "server": {"hostname": "relay.example", "data_dir": str(tmp)},
                    "dns": dns.settings(),
                    "queue": queue,
                }
            )
            storage = await open_storage_from_url(
                f"sqlite+aiosqlite:///{tmp / 'shardmail.db'}",
                tmp / "blobs",
                password_hasher=PasswordHasher.from_parameters(CHEAPEST),
            )
            rng = random.Random(args.seed)
            for n in range(args.messages):
                key = await storage.blobs.put(message(rng, n))
                await storage.queue.enqueue(SENDER, [RCPT], key)
            runner = QueueRunner(settings, storage, Resolver(settings.dns), owner="bench")
            cpu_before, start = cpu(), time.perf_counter()
            runner.start()
            deadline = time.monotonic() + 600
            done = runner.stats
            while (done.delivered + done.failed + done.deferred < args.messages) or (
                runner._in_flight  # the bench waits for the records too
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the queue did not empty in 600 s")
                await asyncio.sleep(0.02)
            elapsed, used = time.perf_counter() - start, cpu() - cpu_before
            stats = runner.stats
            await runner.close()
            await storage.close()
    finally:
        sink.stdin.close()
        counts = (await sink.stdout.readline()).split()
        await sink.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    received, connections = (int(c) for c in counts)
    print(
        f"messages:     {args.messages} (1-20 KB), workers {args.workers}, TLS {args.tls}, "
        f"CHUNKING {args.chunking}"
    )
    print(f"delivered:    {stats.delivered} (failed {stats.failed}, deferred {stats.deferred})")
    print(f"sink:         {received} received over {connections} connections")
    print(f"throughput:   {stats.delivered / elapsed:.1f} messages/s ({elapsed:.2f} s)")
    print(f"relay CPU:    {used:.2f} s ({1000 * used / max(stats.delivered, 1):.2f} ms/message)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sink-child"]:
        asyncio.run(
            sink_child(int(sys.argv[2]), "--tls" in sys.argv[3:], "--chunking" in sys.argv[3:])
        )
    else:
        asyncio.run(main())
