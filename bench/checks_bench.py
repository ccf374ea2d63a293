"""MX delivery with content checks off, with clamd, with rspamd, with both:
messages/s and the CPU per message each adds, in one run (issue #22).

Starts clamd (tests/clamdserver.py: its small EICAR signature database,
built with sigtool), a Redis for rspamd's statistics and rspamd
(tests/rspamdserver.py: network modules off) once, and one mtad per
configuration, each on its own fresh data dir with one local account:

    off     no content check
    clamd   [antivirus] enabled, clamd on its Unix socket
    rspamd  [antispam] rspamd_url, rspamd's normal worker
    both    the two (they run concurrently on each message)

SPF and DKIM are off in every configuration (as smtp_bench.py's default),
so the content checks are the only difference. Then ``--rounds`` rounds,
each delivering ``--messages`` messages over ``--sessions`` SMTP sessions
to every configuration in turn (off clamd rspamd both off clamd ...), so
the machine's load (shared with others) falls on all alike.

The messages: multipart/mixed, a text/plain part of varied real words
(smtp_bench.varied_text, 0.5 to 4 KB) and a base64 application/octet-stream
attachment of random bytes, 2 to 100 KB. Message n has the same sizes and
words in every configuration and round; its attachment's bytes differ
between configurations and rounds, since clamd keeps the digests of clean
files it scanned and skips them next time, which real mail (whose
attachments rarely repeat) would not get.

Before the rounds each configuration must refuse what its checks refuse
and accept the rest: an EICAR attachment (refused by clamd and both), a
GTUBE text (refused by rspamd and both); after them rspamd's controller
must count a scan for each message sent to rspamd and both. A bench whose
checks are silently off stops with an error instead of printing figures.

CPU per message, per configuration over its rounds: each mtad's utime +
stime (/proc/<pid>/stat), clamd's (one process, all its threads), rspamd's
(every process of its session: main, normal worker, controller, and what
they reaped) and its Redis's. Added CPU is a configuration's total less
the "off" total. Never part of the test run.

    python bench/checks_bench.py --messages 100 --rounds 1
    python bench/checks_bench.py --messages 300 --rounds 3 --sessions 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.smtp_bench import (  # noqa: E402
    CLK_TCK,
    cpu_seconds,
    free_port,
    mtad_argv,
    prepare,
    varied_text,
    wait_ready,
)
from tests.clamdserver import EICAR, ClamdServer  # noqa: E402
from tests.dnsserver import Zone, start_dns_server, stop_dns_server  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402
from tests.rspamdserver import GTUBE, RspamdServer  # noqa: E402

CONFIGS = ("off", "clamd", "rspamd", "both")
TEXT_SIZES = (512, 4 * 1024)
ATTACHMENT_SIZES = (2 * 1024, 100 * 1024)
SENDER = "bench@sender.example"


def process_group_cpu_seconds(pgid: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds of the process group ``pgid``: utime + stime of every live
    member, plus cutime + cstime (the members' reaped children: a worker
    that exited keeps counting through the process that waited for it).
    A process gone between listing and reading is skipped."""
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # proc(5): pid (comm) state ppid pgrp ... utime(14) stime cutime cstime;
        # comm may hold spaces and parentheses, so split after the last ")".
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def message(n: int, variant: str, rcpt: str) -> bytes:
    """Message ``n`` (RFC 5322, MIME multipart/mixed per RFC 2046 section
    5.1.3): the same text and part sizes for the same ``n``; attachment
    bytes drawn from ``variant`` too (see the module docstring)."""
    sizes = random.Random(n)
    text = varied_text(sizes.randint(*TEXT_SIZES), n)
    attachment = random.Random(f"{variant}-{n}").randbytes(sizes.randint(*ATTACHMENT_SIZES))
    return mime_message(n, rcpt, text, "data.bin", attachment)


def mime_message(n: int, rcpt: str, text: bytes, filename: str, attachment: bytes) -> bytes:
    """A text part and a base64 attachment, in CRLF lines of 76 characters
    (RFC 2045 section 6.8)."""
    boundary = f"=-bench-{n}-{time.time_ns()}"
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (
        (
            f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: bench {n}\r\n"
            f"Message-ID: <checks-{n}-{time.time_ns()}@sender.example>\r\n"
            f"MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()
        + text
        + (
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f'Content-Disposition: attachment; filename="{filename}"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + encoded
        + f"--{boundary}--\r\n".encode()
    )


async def deliver(port: int, messages: Sequence[bytes], sessions: int, rcpt: str) -> float:
    """Sends ``messages`` to the MX on ``port`` over ``sessions`` parallel
    sessions; every one must be accepted. Returns the wall time."""

    async def one(share: Sequence[bytes]) -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, timeout=120,
            local_hostname="bench.example",
        )  # fmt: skip
        await client.connect()
        await client.ehlo()
        for data in share:
            await client.sendmail(SENDER, [rcpt], data)
        await client.quit()

    start = time.perf_counter()
    await asyncio.gather(*(one(messages[i::sessions]) for i in range(sessions)))
    return time.perf_counter() - start


async def refused(port: int, rcpt: str, data: bytes) -> bool:
    """Whether the MX refuses ``data`` at DATA with a 5xx (RFC 5321 section
    4.2.1); a 4xx is an error of the bench (a check unreachable)."""
    try:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, timeout=60,
            local_hostname="bench.example",
        ) as client:  # fmt: skip
            await client.sendmail(SENDER, [rcpt], data)
    except aiosmtplib.SMTPDataError as exc:
        if exc.code >= 500:
            return True
        raise SystemExit(f"port {port}: temporary failure {exc.code} {exc.message}") from exc
    return False


def expected_refusals(config: str) -> dict[str, bool]:
    """Which probe (eicar, gtube) ``config`` must refuse."""
    return {
        "eicar": config in ("clamd", "both"),
        "gtube": config in ("rspamd", "both"),
    }


async def verify_checks(ports: dict[str, int], rcpt: str) -> None:
    """Stops the bench unless each configuration refuses exactly what its
    checks refuse (module docstring)."""
    probes = {
        "eicar": mime_message(0, rcpt, b"See the attachment.\r\n", "eicar.com", EICAR),
        "gtube": mime_message(0, rcpt, f"{GTUBE}\r\n".encode(), "data.bin", os.urandom(4096)),
    }
    for config, port in ports.items():
        for probe, want in expected_refusals(config).items():
            got = await refused(port, rcpt, probes[probe])
            if got != want:
                raise SystemExit(
                    f"{config}: {probe} was {'refused' if got else 'accepted'}; "
                    "the checks are not as configured"
                )
    print("checks verified: EICAR refused by clamd, both; GTUBE refused by rspamd, both")


def rspamd_scanned(server: RspamdServer) -> int:
    """Messages rspamd scanned so far (its controller's ``/stat``)."""
    return int(server.stat()["scanned"])  # type: ignore[call-overload]


@dataclass
class Figures:
    """One configuration's totals over its rounds."""

    messages: int = 0
    elapsed: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # component -> seconds
    rates: list[float] = field(default_factory=list)  # messages/s of each round

    def add(self, messages: int, elapsed: float, cpu: dict[str, float]) -> None:
        self.messages += messages
        self.elapsed += elapsed
        self.rates.append(messages / elapsed)
        for name, seconds in cpu.items():
            self.cpu[name] = self.cpu.get(name, 0.0) + seconds

    def ms_per_message(self, name: str) -> float:
        return 1000 * self.cpu.get(name, 0.0) / self.messages

    def total_ms(self) -> float:
        return 1000 * sum(self.cpu.values()) / self.messages


def report(figures: dict[str, Figures], components: Sequence[str]) -> None:
    """The table: per configuration messages/s (over all its rounds, and
    each round's), CPU ms per message of each component, total, and the
    total added to "off"'s."""
    print("\nconfig   msgs/s   " + "".join(f"{c:>9}" for c in components) + "    total    added")
    base = figures["off"].total_ms()
    for config, fig in figures.items():
        print(
            f"{config:<8}{fig.messages / fig.elapsed:>7.1f}   "
            + "".join(f"{fig.ms_per_message(c):>9.2f}" for c in components)
            + f"{fig.total_ms():>9.2f}{fig.total_ms() - base:>+9.2f}"
        )
    print("(CPU in ms per message; added = total less off's total)")
    for config, fig in figures.items():
        print(f"{config:<8}rounds: " + ", ".join(f"{r:.1f}" for r in fig.rates) + " msgs/s")


class Bench:
    """The peers and the mtads (one per configuration) of one run."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.clamd: ClamdServer | None = None
        self.redis: RedisServer | None = None
        self.rspamd: RspamdServer | None = None
        self.dns = None
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.ports: dict[str, int] = {}

    async def start(self) -> None:
        """Starts clamd, Redis, rspamd, dnsmasq, then the mtads."""
        self.clamd = await asyncio.to_thread(ClamdServer.start)
        self.redis = await asyncio.to_thread(RedisServer.start)
        self.rspamd = await asyncio.to_thread(RspamdServer.start, self.redis.port)
        # DMARC resolves through an empty-zone dnsmasq on loopback.
        self.dns = await asyncio.to_thread(start_dns_server, Zone())
        checks = {
            "clamd": [
                "antivirus.enabled=true",
                f"antivirus.clamd_socket='{self.clamd.socket_path}'",
            ],
            "rspamd": [f"antispam.rspamd_url='{self.rspamd.url}'"],
        }
        checks["both"] = checks["clamd"] + checks["rspamd"]
        for config in CONFIGS:
            data = self.tmp / config / "data"
            await prepare(data, self.args.rcpt, [])
            port = free_port()
            argv = mtad_argv(data, port, self.dns.port, self.args.sessions, spf_dkim=False)
            # No metrics listener: four mtads (and others' servers) would
            # contend for its one default port.
            for override in ["server.metrics_listen=[]", *checks.get(config, [])]:
                argv += ["-o", override]
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=REPO, stderr=asyncio.subprocess.PIPE
            )
            self.procs[config] = proc
            await wait_ready(proc)
            self.ports[config] = port

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for server in (self.rspamd, self.redis, self.clamd):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self.dns is not None:
            stop_dns_server(self.dns)

    def meters(self) -> dict[str, Callable[[], float]]:
        """Component name -> its CPU seconds so far (mtad: the one being
        measured, read by :meth:`run_round`)."""
        assert self.clamd and self.clamd.proc and self.rspamd and self.rspamd.proc
        assert self.redis and self.redis.proc
        clamd, rspamd, redis = self.clamd.proc.pid, self.rspamd.proc.pid, self.redis.proc.pid
        return {
            "clamd": lambda: process_group_cpu_seconds(clamd),
            "rspamd": lambda: process_group_cpu_seconds(rspamd),
            "redis": lambda: cpu_seconds(redis),
        }

    async def run_round(self, config: str, messages: Sequence[bytes]) -> tuple[float, dict]:
        """Delivers ``messages`` to ``config``'s mtad; wall time and the CPU
        seconds of each component over it."""
        meters = {"mtad": lambda: cpu_seconds(self.procs[config].pid), **self.meters()}
        before = {name: read() for name, read in meters.items()}
        elapsed = await deliver(self.ports[config], messages, self.args.sessions, self.args.rcpt)
        await asyncio.sleep(0.2)  # rspamd's controller and logging catch up
        return elapsed, {name: read() - before[name] for name, read in meters.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--rcpt", default="user@bench.example")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tmp = Path(tempfile.mkdtemp(prefix="checks-bench-"))
    bench = Bench(args, tmp)
    try:
        await bench.start()
        await verify_checks(bench.ports, args.rcpt)
        assert bench.rspamd is not None
        # Warm-up (imports, first connections, rspamd's first tasks): not counted.
        warm = [message(n, "warm", args.rcpt) for n in range(min(20, args.messages))]
        for config in CONFIGS:
            await deliver(bench.ports[config], warm, min(4, args.sessions), args.rcpt)
        scanned = rspamd_scanned(bench.rspamd)
        figures = {config: Figures() for config in CONFIGS}
        for rnd in range(args.rounds):
            for config in CONFIGS:
                batch = [message(n, f"{config}-{rnd}", args.rcpt) for n in range(args.messages)]
                elapsed, cpu = await bench.run_round(config, batch)
                figures[config].add(len(batch), elapsed, cpu)
                print(
                    f"round {rnd + 1} {config:<6} {len(batch) / elapsed:7.1f} msgs/s, "
                    f"{sum(len(m) for m in batch) / len(batch) / 1024:.1f} KB mean",
                    flush=True,
                )
        scans = rspamd_scanned(bench.rspamd) - scanned
        want = 2 * args.rounds * args.messages
        if scans < want:
            raise SystemExit(f"rspamd counted {scans} scans, {want} were sent to it")
        print(f"rspamd scans counted: {scans} (sent to rspamd and both: {want})")
        report(figures, ("mtad", "clamd", "rspamd", "redis"))
        print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        bench.stop()
        for proc in bench.procs.values():
            await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
