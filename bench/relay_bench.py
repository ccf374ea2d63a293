"""Outbound relay throughput, shardmail beside Postfix: submission to
delivery at one sink peer, DKIM-signed on both sides (issue #23).

Starts a dnsmasq (MX of sink.bench -> 127.0.0.9), an asyncio sink SMTP
server on 127.0.0.9 (tests/integration/outbound/sink.py), mtad as its own
process (``python -m mtad``) with queue workers and, unless ``--no-dkim``,
a DKIM key for the sender's domain (signed in its content pool worker,
``mtad/outbound/signing.py``), and, unless ``--no-postfix``, Debian's
Postfix relaying to the same sink with OpenDKIM signing as a milter, with
the same key (``bench/postfix_dkim_relay.py``). Each round submits the
same messages over parallel sessions to mtad (587, AUTH PLAIN, plaintext
allowed for the bench), then to Postfix (its smtpd, relaying for
127.0.0.0/8 without AUTH): runs alternate, A B A B. The clock runs from
the first submission until the sink holds every message of the run.
Reports messages/s end to end and CPU per message of each side: mtad's
process with its content workers; every Postfix process plus OpenDKIM's.
A few delivered messages of each run are checked with dkimpy against the
published key. Never part of the test run; everything stays on
127.0.0.0/8. ``--processes 1,2`` runs mtad once per count of
``server.processes`` (worker processes sharing its listeners and its
queue; every listener on a fixed port), as sides ``shardmail/p1``,
``shardmail/p2``. AUTH refused with 454 and retried is counted per run.

    python bench/relay_bench.py --messages 300 --sessions 5 --rounds 2
    python bench/relay_bench.py --messages 600 --sessions 20 --processes 1,2
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
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.dovecot_peer import proc_cpu_seconds, process_tree, tree_cpu_seconds  # noqa: E402
from bench.smtp_bench import make_message  # noqa: E402

SINK_IP = "127.0.0.9"
DOMAIN = "relay.example"
SELECTOR = "shardmail"
SENDER = f"bench@{DOMAIN}"
PASSWORD = "bench-password"
RCPT = "sink@sink.bench"
VERIFIED_PER_RUN = 3


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def prepare(
    data_dir: Path, dkim: bool, key: tuple[bytes, str] | None = None
) -> tuple[bytes, str] | None:
    """The sender's account; with ``dkim``, its key file as ``mailctl dkim
    generate`` made it, or ``key`` written as one: (private PEM, TXT record).
    The password is hashed at mtad's own default cost, as ``mailctl account
    add`` would: a cheaper hash is upgraded at the first logins, each
    process's concurrent first logins upgrading it again and making the
    others' cache entries stale (a login storm no real site sees)."""
    from conf.settings import AuthSettings
    from mtad.outbound.signing import generate_key
    from storage import open_storage_from_url, password_hasher

    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    store = await open_storage_from_url(
        f"sqlite+aiosqlite:///{data_dir / 'shardmail.db'}",
        data_dir / "blobs",
        password_hasher=password_hasher(AuthSettings()),
    )
    try:
        await store.directory.add_domain(DOMAIN)
        await store.directory.add_account(SENDER, PASSWORD)
    finally:
        await store.close()
    if not dkim:
        return None
    if key is not None:
        (data_dir / "dkim").mkdir(mode=0o700)
        (data_dir / "dkim" / f"{DOMAIN}.{SELECTOR}.key").write_bytes(key[0])
        return key
    path, record = generate_key(data_dir / "dkim", DOMAIN, SELECTOR)
    return path.read_bytes(), record


def message(size: int, n: int) -> bytes:
    # Submission takes only a From: the user owns (mtad/session.py).
    return make_message(size, n, RCPT).replace(
        b"From: bench@sender.example", f"From: {SENDER}".encode(), 1
    )


AUTH_RETRIES = [0]  # 454s to AUTH retried, across every run so far


async def connect(port: int, login: bool) -> aiosmtplib.SMTP:
    """A session, logged in with ``login``; a 454 to AUTH (the login gate
    busy with the other sessions' logins, RFC 4954 section 6) is retried on
    a new connection, as a client would, and counted in ``AUTH_RETRIES``."""
    for attempt in range(50):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await client.connect()
        await client.ehlo()
        if not login:
            return client
        try:
            await client.login(SENDER, PASSWORD)
            return client
        except (aiosmtplib.SMTPAuthenticationError, aiosmtplib.SMTPServerDisconnected) as exc:
            if getattr(exc, "code", 454) != 454 or attempt == 49:
                raise
            client.close()
            AUTH_RETRIES[0] += 1
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def submit(port: int, count: int, size: int, offset: int, login: bool) -> int:
    client = await connect(port, login)
    for i in range(count):
        await client.sendmail(SENDER, [RCPT], message(size, offset + i))
    await client.quit()
    return count


async def wait_for_count(sink, count: int, timeout: float) -> bool:
    """Until the sink holds ``count`` messages (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(sink.received) >= count:
            return True
        await asyncio.sleep(0.02)
    return False


def mtad_cpu(pid: int) -> tuple[float, float]:
    """(mtad's whole tree: content workers included, its mtad processes:
    the one, or a supervisor and its ``server.processes`` workers)."""
    own = 0.0
    for child in process_tree(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = f.read()
            # Content workers are spawned (multiprocessing), server workers forked.
            if b"mtad" in argv and b"multiprocessing" not in argv:
                own += proc_cpu_seconds(child, with_children=False)
        except (OSError, ValueError):
            continue  # gone meanwhile
    return tree_cpu_seconds(pid), own


def header_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def verified(received: list, record: str | None) -> tuple[int, int]:
    """(messages with a DKIM-Signature field, of the first few how many
    verify with dkimpy against ``record``)."""
    import dkim

    signed = [r.data for r in received if b"DKIM-Signature:" in header_of(r.data)]
    if record is None:
        return len(signed), 0

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record.encode() if name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode() else b""

    good = sum(bool(dkim.verify(d, dnsfunc=dnsfunc)) for d in signed[:VERIFIED_PER_RUN])
    return len(signed), good


@dataclass
class Run:
    side: str
    delivered: int
    submitted_s: float
    elapsed_s: float
    cpu_s: float  # the side's whole CPU
    cpu_detail: str
    signed: int
    verified: int
    load: float
    auth_retries: int = 0

    def line(self, messages: int) -> str:
        return (
            f"{self.side:12} {self.delivered:5}/{messages} in {self.elapsed_s:6.2f} s "
            f"= {self.delivered / self.elapsed_s:6.1f} msg/s  "
            f"(submitted {messages / self.submitted_s:6.1f} msg/s)  "
            f"CPU {1000 * self.cpu_s / max(self.delivered, 1):5.2f} ms/msg ({self.cpu_detail})  "
            f"signed {self.signed}, verified {self.verified}/{min(VERIFIED_PER_RUN, self.signed)}  "
            f"AUTH 454 retried {self.auth_retries}  load {self.load:.2f}"
        )


class Side:
    """One relay under test: where to submit and what CPU it used."""

    name = ""
    port = 0
    login = False

    def cpu(self) -> tuple[float, ...]:
        """CPU seconds so far: the side's total first, then its parts."""
        raise NotImplementedError

    def detail(self, spent: tuple[float, ...]) -> str:
        raise NotImplementedError


class Shardmail(Side):
    login = True

    def __init__(self, name: str, pid: int, port: int) -> None:
        self.name = name
        self.pid = pid
        self.port = port

    def cpu(self) -> tuple[float, ...]:
        return mtad_cpu(self.pid)

    def detail(self, spent: tuple[float, ...]) -> str:
        tree, own = spent
        return f"mtad {own:.2f} s + content workers {tree - own:.2f} s"


class Postfix(Side):
    name = "postfix"

    def __init__(self, relay) -> None:
        self.relay = relay
        self.port = relay.port

    def cpu(self) -> tuple[float, ...]:
        postfix, milter = self.relay.cpu_seconds()
        return postfix + milter, postfix, milter

    def detail(self, spent: tuple[float, ...]) -> str:
        _total, postfix, milter = spent
        return f"postfix {postfix:.2f} s + opendkim {milter:.2f} s"


async def run(side: Side, sink, args: argparse.Namespace, record: str | None, count: int) -> Run:
    """``count`` messages over ``args.sessions`` sessions into ``side``,
    timed until the sink holds them all."""
    per = [
        count // args.sessions + (1 if i < count % args.sessions else 0)
        for i in range(args.sessions)
    ]
    offsets = [sum(per[:i]) for i in range(args.sessions)]
    base = len(sink.received)
    retries_before = AUTH_RETRIES[0]
    cpu_before = side.cpu()
    start = time.perf_counter()
    await asyncio.gather(
        *(
            submit(side.port, n, args.size, o, side.login)
            for n, o in zip(per, offsets, strict=True)
            if n
        )
    )
    submitted = time.perf_counter() - start
    if not await wait_for_count(sink, base + count, timeout=600):
        log = getattr(getattr(side, "relay", None), "postfix_log", lambda: "")()
        raise SystemExit(f"{side.name}: only {len(sink.received) - base} of {count}\n{log[-3000:]}")
    elapsed = time.perf_counter() - start
    cpu_after = side.cpu()
    spent = tuple(a - b for a, b in zip(cpu_after, cpu_before, strict=True))
    got = sink.received[base : base + count]
    signed, good = verified(got, record)
    return Run(
        side.name,
        len(got),
        submitted,
        elapsed,
        spent[0],
        side.detail(spent),
        signed,
        good,
        os.getloadavg()[0],
        AUTH_RETRIES[0] - retries_before,
    )


def mtad_argv(
    args: argparse.Namespace,
    data_dir: Path,
    dns_port: int,
    relay_port: int,
    submission: int,
    processes: int = 1,
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mtad",
        "-o",
        f"server.data_dir='{data_dir}'",
        "-o",
        f"server.processes={processes}",
        "-o",
        "server.log_level='WARNING'",
        "-o",
        "server.metrics_listen=[]",
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
        f"dns.port={dns_port}",
        "-o",
        f"queue.workers={args.workers}",
        "-o",
        f"queue.per_domain_concurrency={args.per_domain}",
        "-o",
        f"queue.smtp_port={relay_port}",
        "-o",
        "queue.poll_interval_seconds=0.2",
    ]  # fmt: skip


async def start_mtad(
    repo: Path,
    args: argparse.Namespace,
    data_dir: Path,
    dns_port: int,
    relay_port: int,
    processes: int = 1,
) -> tuple[asyncio.subprocess.Process, int]:
    """mtad of the checkout ``repo`` (its packages first on the path) with
    ``processes`` as ``server.processes``, and its submission port, once
    that answers (every listener on a fixed port: workers share them)."""
    submission = free_port()
    argv = mtad_argv(args, data_dir, dns_port, relay_port, submission, processes)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = await asyncio.create_subprocess_exec(*argv, cwd=repo, env=env)
    try:
        await wait_listening(submission, proc)
    except BaseException:
        await stop_mtad(proc)
        raise
    return proc, submission


async def stop_mtad(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
    await proc.wait()


async def wait_listening(port: int, proc) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            break
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit("mtad did not start")


async def main() -> None:
    from bench.postfix_dkim_relay import PostfixDkimRelay
    from tests.dnsserver import Zone, dns_server
    from tests.integration.outbound.sink import SinkServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300, help="per run")
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--size", type=int, default=5 * 1024)
    parser.add_argument("--workers", type=int, default=16, help="queue.workers")
    parser.add_argument("--per-domain", type=int, default=16, help="per_domain_concurrency")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A B runs")
    parser.add_argument("--warmup", type=int, default=20, help="messages per side first")
    parser.add_argument("--no-dkim", action="store_true", help="sign on neither side")
    parser.add_argument("--no-postfix", action="store_true", help="shardmail alone")
    parser.add_argument(
        "--processes",
        default="1",
        help="server.processes of mtad, or a comma list: one side per count (0: one per CPU)",
    )
    parser.add_argument(
        "--chunking",
        action="store_true",
        help="the sink offers CHUNKING (RFC 3030): mtad sends BDAT, not DATA",
    )
    parser.add_argument(
        "--dns-ttl",
        type=int,
        default=0,
        help="TTL of the sink's MX and A records (dnsmasq's --local-ttl; 0: every "
        "delivery resolves them again, as before; Postfix's side resolves nothing)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run mtad of this checkout (e.g. /work/main) as side 'baseline'",
    )
    args = parser.parse_args()
    counts = [int(n) for n in str(args.processes).split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    checkouts: list[tuple[str, Path, Path, int]] = []
    for n in counts:  # each side its own data directory: its own queue
        suffix = f"/p{n}" if len(counts) > 1 else ""
        checkouts.append((f"shardmail{suffix}", REPO, tmp / f"data-p{n}", n))
        if args.baseline:
            checkouts.append((f"baseline{suffix}", args.baseline.resolve(), tmp / f"base-p{n}", n))
    key = None
    for _name, _repo, data_dir, _n in checkouts:
        key = await prepare(data_dir, not args.no_dkim, key)
    record = key[1] if key else None
    relay_port = free_port(SINK_IP)
    zone = Zone().a("mx.sink.bench", SINK_IP).mx("sink.bench", "mx.sink.bench", 10)
    if args.dns_ttl:
        zone.options.append(f"--local-ttl={args.dns_ttl}")
    runs: list[Run] = []
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    sink_server = SinkServer(SINK_IP, relay_port)
    if args.chunking:
        sink_server.extensions = [*sink_server.extensions, "CHUNKING"]
    async with dns_server(zone) as dns, sink_server as sink:
        procs: list[asyncio.subprocess.Process] = []
        relay = None
        try:
            sides: list[Side] = []
            for name, repo, data_dir, n in checkouts:
                proc, submission = await start_mtad(repo, args, data_dir, dns.port, relay_port, n)
                procs.append(proc)
                sides.append(Shardmail(name, proc.pid, submission))
            if not args.no_postfix:
                relay = PostfixDkimRelay(
                    DOMAIN,
                    key[0] if key else b"",
                    SELECTOR,
                    SINK_IP,
                    relay_port,
                    dkim=key is not None,
                )
                await asyncio.to_thread(relay.start)
                sides.append(Postfix(relay))
            for side in sides:  # spawn workers, open caches: not measured
                await run(side, sink, args, record, args.warmup)
            for n in range(args.rounds):
                # A B C, then C B A: no side always runs first, or last.
                for side in sides if n % 2 == 0 else sides[::-1]:
                    result = await run(side, sink, args, record, args.messages)
                    print(result.line(args.messages), flush=True)
                    runs.append(result)
        finally:
            for proc in procs:
                await stop_mtad(proc)
            if relay is not None:
                await asyncio.to_thread(relay.stop)
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"messages:      {args.messages} x {args.size} bytes per run, {args.sessions} sessions")
    print(
        f"shardmail:     queue.workers {args.workers} (per domain {args.per_domain}) "
        f"per process; server.processes {args.processes}"
    )
    for side in [*(c[0] for c in checkouts), "postfix"]:
        mine = [r for r in runs if r.side == side]
        if mine:
            rates = [r.delivered / r.elapsed_s for r in mine]
            cpus = [1000 * r.cpu_s / r.delivered for r in mine]
            print(
                f"{side:12}   {min(rates):.1f}-{max(rates):.1f} msg/s, "
                f"{min(cpus):.2f}-{max(cpus):.2f} ms CPU per message"
            )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
