"""Shard capacity: delivered messages per CPU-second over 1, 2 and 4 shards.

Issue #19 asks that the cost of a delivered message stay flat (within 15%)
as shards are added: a shard adds capacity, not overhead. For each shard
count N this starts N PostgreSQL servers (durable: fsync and synchronous
commit on, ``PgServer.start(durable=True)``), one database each, and puts
the directory in a database of its own on the first; creates ``--accounts``
accounts placed round robin over the shards; starts ``mtad`` as its own
process over them; and sends ``--messages`` 5 KB messages over SMTP in
``--sessions`` parallel sessions, each message to the next account in turn
(so every shard gets its share). It reports delivered messages/s, mtad
CPU-seconds and PostgreSQL CPU-seconds (every postgres process of every
server, from /proc) per message, and delivered messages per CPU-second
(mtad + PostgreSQL), each shard count against the first. Never part of the
test run.

    python -m bench.shard_scale --shards 1,2,4 --messages 3000 --sessions 20 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.dovecot_peer import proc_cpu_seconds, process_tree  # noqa: E402
from bench.smtp_bench import cpu_seconds, free_port, make_message, wait_ready  # noqa: E402
from tests.dnsserver import Zone, start_dns_server, stop_dns_server  # noqa: E402
from tests.pgserver import PgServer  # noqa: E402

DOMAIN = "shards.example"


def postgres_cpu_seconds(servers: list[PgServer]) -> float:
    """CPU of every postgres process of ``servers`` so far: each postmaster
    with the backends it has reaped, plus every live backend and worker."""
    total = 0.0
    for server in servers:
        postmaster = server.proc.pid
        total += proc_cpu_seconds(postmaster)
        for pid in process_tree(postmaster):
            if pid != postmaster:
                with contextlib.suppress(OSError):
                    total += proc_cpu_seconds(pid, with_children=False)
    return total


@dataclass
class Site:
    """N shard servers and the storage settings (``-o`` overrides) over them;
    ``urls`` maps each shard's name (and "directory") to its database URL."""

    servers: list[PgServer]
    overrides: list[str]
    shards: list[str]
    urls: dict[str, str]


async def start_site(shards: int) -> Site:
    """One durable PostgreSQL server per shard; the directory is a database
    of its own on the first server."""
    servers: list[PgServer] = []
    try:
        for _ in range(shards):
            servers.append(await asyncio.to_thread(PgServer.start, durable=True))
        directory = await servers[0].create_database()
        names = ["default"] + [f"s{i + 1}" for i in range(1, shards)]
        overrides = [f"storage.url='{directory}'"]
        urls = {"directory": directory}
        for name, server in zip(names, servers, strict=True):
            urls[name] = await server.create_database()
            overrides.append(f"storage.shards.{name}.url='{urls[name]}'")
        return Site(servers, overrides, names, urls)
    except BaseException:
        for server in servers:
            server.stop()
        raise


def stop_site(site: Site) -> None:
    for server in site.servers:
        server.stop()


async def make_accounts(
    site: Site, data_dir: Path, count: int, password: str = "bench-password"
) -> list[str]:
    """``count`` accounts, placed round robin over the shards."""
    from conf.settings import load_settings
    from storage import open_storage

    settings = load_settings(overrides=[f"server.data_dir='{data_dir}'", *site.overrides])
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    store = await open_storage(settings.storage, data_dir=data_dir)
    addresses = [f"user{i}@{DOMAIN}" for i in range(count)]
    try:
        await store.directory.add_domain(DOMAIN)
        for address, shard in zip(addresses, itertools.cycle(site.shards), strict=False):
            await store.directory.add_account(address, password, shard=shard)
    finally:
        await store.close()
    return addresses


# A message's bytes from its number and recipient.
MessageMaker = Callable[[int, str], bytes]


async def session(port: int, jobs: list[tuple[int, str]], make: MessageMaker) -> int:
    """One SMTP session sending each (number, recipient) of ``jobs``."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=60, local_hostname="bench"
    )
    await client.connect()
    await client.ehlo()
    for n, rcpt in jobs:
        await client.sendmail("bench@sender.example", [rcpt], make(n, rcpt))
    await client.quit()
    return len(jobs)


async def load(
    port: int, messages: int, sessions: int, rcpts: list[str], make: MessageMaker
) -> float:
    """Sends ``messages`` messages to ``rcpts`` in turn; the wall time."""
    jobs = [(n, rcpts[n % len(rcpts)]) for n in range(messages)]
    start = time.perf_counter()
    sent = await asyncio.gather(*(session(port, jobs[i::sessions], make) for i in range(sessions)))
    assert sum(sent) == messages
    return time.perf_counter() - start


async def start_mtad(
    data_dir: Path, site: Site, sessions: int, dns_port: int
) -> tuple[asyncio.subprocess.Process, int]:
    """``mtad`` as a process of its own over ``site`` (MX on a free loopback
    port, SPF and DKIM checks off, no per-IP limits below ``sessions``);
    returns it and its MX port once it is ready."""
    port = free_port()
    argv = [sys.executable, "-m", "mtad"]
    for override in [
        f"server.data_dir='{data_dir}'",
        "server.log_level='WARNING'",
        "server.metrics_listen=[]",
        f"smtp.mx_listen=['127.0.0.1:{port}']",
        f"smtp.submission_listen=['127.0.0.1:{free_port()}']",
        f"smtp.submissions_listen=['127.0.0.1:{free_port()}']",
        "smtp.rate_limit_per_ip=0",
        f"smtp.max_connections_per_ip={sessions + 5}",
        "smtp.spf=false",
        "smtp.dkim_verify=false",
        "dns.nameservers=['127.0.0.1']",
        f"dns.port={dns_port}",
        *site.overrides,
    ]:
        argv += ["-o", override]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_ready(proc)
    except BaseException:
        proc.terminate()
        await proc.wait()
        raise
    return proc, port


@dataclass
class Run:
    shards: int
    messages: int
    elapsed: float
    mtad_cpu: float
    db_cpu: float

    @property
    def per_cpu_second(self) -> float:
        return self.messages / (self.mtad_cpu + self.db_cpu)


async def run_once(args: argparse.Namespace, shards: int) -> Run:
    """One shard count: a fresh site, mtad over it, the load, the figures."""
    tmp = Path(tempfile.mkdtemp(prefix="shard-scale-"))
    site = await start_site(shards)
    dns = await asyncio.to_thread(start_dns_server, Zone())
    proc: asyncio.subprocess.Process | None = None
    try:
        rcpts = await make_accounts(site, tmp / "data", args.accounts)
        proc, port = await start_mtad(tmp / "data", site, args.sessions, dns.port)

        def make(n: int, rcpt: str) -> bytes:
            return make_message(args.size, n, rcpt)

        # A warm-up so imports, first connections and pools do not count.
        await load(port, min(100, args.messages), 4, rcpts, make)
        mtad_before, db_before = cpu_seconds(proc.pid), postgres_cpu_seconds(site.servers)
        elapsed = await load(port, args.messages, args.sessions, rcpts, make)
        await asyncio.sleep(0.5)  # checkpoints and WAL writes of the last commits
        return Run(
            shards,
            args.messages,
            elapsed,
            cpu_seconds(proc.pid) - mtad_before,
            postgres_cpu_seconds(site.servers) - db_before,
        )
    finally:
        if proc is not None:
            proc.terminate()
            await proc.wait()
        stop_dns_server(dns)
        stop_site(site)
        shutil.rmtree(tmp, ignore_errors=True)


def report(args: argparse.Namespace, runs: list[Run]) -> None:
    print(
        f"\n{args.messages} messages x {args.size} bytes, {args.sessions} sessions, "
        f"{args.accounts} accounts, {args.rounds} round(s) per shard count"
    )
    print(
        f"{'shards':>6} {'msg/s':>8} {'mtad ms/msg':>12} {'pg ms/msg':>10} "
        f"{'msg/CPU-s':>10} {'vs first':>9}"
    )
    by_count: dict[int, list[Run]] = {}
    for run in runs:
        by_count.setdefault(run.shards, []).append(run)
    base: float | None = None
    for count, group in by_count.items():
        rate = statistics.median(r.messages / r.elapsed for r in group)
        mtad = statistics.median(1000 * r.mtad_cpu / r.messages for r in group)
        pg = statistics.median(1000 * r.db_cpu / r.messages for r in group)
        per_cpu = statistics.median(r.per_cpu_second for r in group)
        base = base or per_cpu
        print(
            f"{count:>6} {rate:>8.1f} {mtad:>12.2f} {pg:>10.2f} {per_cpu:>10.1f} "
            f"{per_cpu / base:>8.2f}x"
        )
        for r in group:
            print(
                f"{'':>6}   round: {r.messages / r.elapsed:.1f} msg/s, mtad {r.mtad_cpu:.2f} s, "
                f"postgres {r.db_cpu:.2f} s, {r.per_cpu_second:.1f} msg/CPU-s"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shards", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4]
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5 * 1024)
    parser.add_argument("--accounts", type=int, default=40)
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs per shard count, interleaved (medians shown)"
    )
    args = parser.parse_args()
    runs = []
    # Interleaved (1, 2, 4, 1, 2, 4 ...): the machine's drift spreads evenly.
    for _round in range(args.rounds):
        for shards in args.shards:
            run = await run_once(args, shards)
            print(
                f"{shards} shard(s): {run.messages / run.elapsed:.1f} msg/s, "
                f"{run.per_cpu_second:.1f} msg/CPU-s",
                flush=True,
            )
            runs.append(run)
    report(args, sorted(runs, key=lambda r: r.shards))


if __name__ == "__main__":
    asyncio.run(main())
