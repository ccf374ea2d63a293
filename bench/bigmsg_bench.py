"""Large messages (1, 10 and 25 MB) on the filesystem and on S3: ingest,
FETCH, POP3 RETR and the server's memory per session (issue #21).

Starts one S3-compatible server (tests/swiftserver.py: Swift with s3api on
loopback) and an empty-zone dnsmasq (for mtad's DMARC lookups) once, and
keeps one site per blob backend, each a fresh data dir with SQLite:

    fs    blobs in data_dir/blobs (storage/blob/fs.py)
    s3    blobs in the Swift bucket, storage.blob_url (storage/blob/s3.py)

Then ``--rounds`` rounds; each round runs, for every size and every backend
in turn (1 MB fs, 1 MB s3, 10 MB fs, ...; the backends swap places each
round), one batch:

1. mtad (``python -m mtad``) and imapd (``python -m imapd``, IMAP and POP3)
   start on the backend's site, as the systemd units run them, and are
   warmed up with one 2 MB message to a second account (delivered,
   fetched, retrieved), so imports, first connections and the SMTP
   spool's first use do not count;
2. ingest: ``--messages`` messages over ``--sessions`` concurrent SMTP
   sessions (smtplib) to the MX; messages/s, MB/s, mtad's CPU per MB (and
   Swift's, on s3: its four processes);
3. FETCH: each message back whole (``UID FETCH n BODY.PEEK[]``, imaplib)
   over ``--sessions`` concurrent IMAP sessions, then a partial fetch
   (``BODY.PEEK[]<start.1000000>``, 1 MB from the middle) of up to three
   messages in one session; imapd's CPU per MB;
4. POP3: every message RETR'd in one session (a maildrop takes one
   session at a time, RFC 1939 section 8);
5. the messages are expunged and both daemons stop (a fresh process per
   batch, so each batch's idle memory is a warmed-up process's, not what
   an earlier batch's allocator kept).

Each message is multipart/mixed: a text/plain part of varied real words and
one (1 MB) or two (larger) base64 attachments of random bytes, different
bytes in every batch, so no attachment is already stored. Sizes are decimal
megabytes: a 25 MB message is 25,000,000 octets, under the default
``server.max_message_size`` of 25 MiB (26,214,400) with room for the trace
fields mtad prepends.

Every fetched or retrieved message is checked byte for byte: it must end
with exactly the octets sent (same length and SHA-256), and what precedes
them must be fields mtad prepends (Return-Path, Received,
Authentication-Results, X-Spam-*). The partial fetch must equal the same range of
the regenerated message behind the same prefix. A mismatch stops the
bench.

Memory: the serving process's /proc/<pid>/status (mtad's during ingest,
imapd's during FETCH and RETR). Before a phase the peak is reset (writing
5 to /proc/<pid>/clear_refs, Linux 4.0+) and VmRSS read as the idle
figure; during it VmRSS is sampled every 10 ms; after it the peak is the
larger of the sampled maximum and VmHWM. Memory per session = (peak -
idle) / concurrent sessions of that phase. The same of RssAnon (VmRSS
less mapped files: a message mmap'd to be split is page cache) from the
samples, and apart that of the daemon's content workers (the processes
that parse messages over 1 MB, storage/contentpool.py). CPU: the daemon's
utime + stime with its content workers'. SPF and DKIM are off in mtad
(as in smtp_bench.py) unless ``--checks``. Never part of the test run.

    python -m bench.bigmsg_bench --messages 6 --sessions 3 --rounds 2
    python -m bench.bigmsg_bench --messages 2 --sessions 2 --rounds 1 --sizes 0.3,1.2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import imaplib
import os
import poplib
import random
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.checks_bench import process_group_cpu_seconds  # noqa: E402
from bench.smtp_bench import cpu_seconds, free_port, mtad_argv, varied_text  # noqa: E402
from tests.dnsserver import Zone, start_dns_server, stop_dns_server  # noqa: E402
from tests.swiftserver import SwiftServer  # noqa: E402

MB = 1_000_000
BACKENDS = ("fs", "s3")
SENDER = "bench@sender.example"
RCPT = "user@bench.example"
WARM_RCPT = "warm@bench.example"
PASSWORD = "bench-password"
PARTIAL = 1_000_000  # octets of the partial fetch
PARTIALS = 3  # partial fetches per batch
# What mtad prepends: trace fields (RFC 5321 section 4.4), the checks'
# results (RFC 8601) and the anti-spam verdict (delivery/antispam).
PREPENDED = frozenset(
    {b"return-path", b"received", b"authentication-results"}
    | {b"x-spam-" + n for n in (b"score", b"status", b"symbols", b"checked", b"policy")}
)
SAMPLE_SECONDS = 0.01

# ------------------------------------------------------------------ memory


class Status(NamedTuple):
    """Of /proc/<pid>/status (proc(5)), in KiB: VmRSS, VmHWM (its peak)
    and RssAnon (the part of VmRSS that is the process's own memory, not
    mapped files: an mmap'd message counts in VmRSS, in the page cache)."""

    rss: int
    hwm: int
    anon: int


def read_status(pid: int, proc: Path = Path("/proc")) -> Status:
    """``pid``'s :class:`Status`."""
    found: dict[str, int] = {}
    for line in (proc / str(pid) / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon"):
            found[name] = int(value.split()[0])  # "  123456 kB"
    if len(found) != 3:
        raise RuntimeError(f"no VmRSS, VmHWM, RssAnon in {proc}/{pid}/status")
    return Status(found["VmRSS"], found["VmHWM"], found["RssAnon"])


def reset_peak(pid: int, proc: Path = Path("/proc")) -> bool:
    """Resets ``pid``'s VmHWM to its current RSS (``5`` to clear_refs,
    proc(5), Linux 4.0+); False where that is refused."""
    try:
        (proc / str(pid) / "clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Memory:
    """One phase's memory of one process, in KiB: RSS before it, the
    sampled maximum VmRSS, and VmHWM after it (``hwm_reset``: whether
    the peak was reset before the phase, else VmHWM is the process's
    lifetime peak and is not used); RssAnon before it and its sampled
    maximum (no kernel peak exists for it)."""

    idle: int
    sampled: int
    hwm: int
    hwm_reset: bool
    sessions: int
    anon_idle: int = 0
    anon_sampled: int = 0

    @property
    def peak(self) -> int:
        return max(self.sampled, self.hwm) if self.hwm_reset else self.sampled

    def per_session_mb(self) -> float:
        """(peak - idle) / sessions, in MB (10^6 octets); never negative
        (a phase may end below its idle RSS when memory is given back)."""
        return max(0, self.peak - self.idle) * 1024 / MB / self.sessions

    def anon_per_session_mb(self) -> float:
        """The same for RssAnon, from the 10 ms samples."""
        return max(0, self.anon_sampled - self.anon_idle) * 1024 / MB / self.sessions


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The live child processes of ``pid`` (a daemon's content workers,
    storage/contentpool.py), from each /proc/<n>/stat's ppid (proc(5))."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def read_total(pids: Sequence[int], proc: Path = Path("/proc")) -> Status:
    """The sum of the processes' :class:`Status` (a process gone counts 0)."""
    total = Status(0, 0, 0)
    for pid in pids:
        with contextlib.suppress(OSError):
            now = read_status(pid, proc)
            total = Status(total.rss + now.rss, total.hwm + now.hwm, total.anon + now.anon)
    return total


class RssSampler:
    """Samples the VmRSS of ``pids`` (summed) on a thread while in its
    ``with`` block; :attr:`memory` holds the phase's figures after it.
    For one process its VmHWM is the exact peak; for several, the sum of
    their peaks bounds the peak of their sum from above."""

    def __init__(self, pids: Sequence[int], sessions: int, proc: Path = Path("/proc")) -> None:
        self.pids = list(pids)
        self.sessions = sessions
        self.proc = proc
        self.memory: Memory | None = None
        self._stop = threading.Event()
        self._max = self._anon = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._reset = all([reset_peak(pid, self.proc) for pid in self.pids])
        self._idle = read_total(self.pids, self.proc)
        self._max, self._anon = self._idle.rss, self._idle.anon
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            now = read_total(self.pids, self.proc)
            self._max, self._anon = max(self._max, now.rss), max(self._anon, now.anon)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        now = read_total(self.pids, self.proc)
        self.memory = Memory(
            self._idle.rss, max(self._max, now.rss), now.hwm, self._reset, self.sessions,
            self._idle.anon, max(self._anon, now.anon),
        )  # fmt: skip


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Spec:
    """Message ``n`` of size ``size`` octets in one batch (``tag``: the
    backend and round, so every batch has bytes of its own)."""

    tag: str
    size: int
    n: int

    @property
    def message_id(self) -> str:
        return f"<bigmsg-{self.tag}-{self.size}-{self.n}@sender.example>"


def encoded_length(raw: int) -> int:
    """Octets of ``raw`` bytes in base64 lines of 76 characters ending in
    CRLF (RFC 2045 section 6.8), as :func:`attachment_part` writes them."""
    full, rest = divmod(raw, 57)
    return full * 78 + ((rest + 2) // 3 * 4 + 2 if rest else 0)


def attachment_part(boundary: str, name: str, data: bytes) -> bytes:
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + encoded


def message(spec: Spec, rcpt: str = RCPT) -> bytes:
    """The message of ``spec`` (RFC 5322; MIME multipart/mixed, RFC 2046
    section 5.1.3), the same octets every time: 2 to 16 KB of text and one
    attachment (under 5 MB) or two of random bytes, together a little
    under ``spec.size`` octets (never over it)."""
    rng = random.Random(f"{spec.tag}/{spec.size}/{spec.n}")
    boundary = f"=-bigmsg-{spec.tag}-{spec.n}"
    head = (
        f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: bigmsg {spec.size} {spec.n}\r\n"
        f"Message-ID: {spec.message_id}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode() + varied_text(rng.randint(2_000, 16_000), spec.n)
    names = ["data-1.bin"] if spec.size < 5 * MB else ["data-1.bin", "data-2.bin"]
    tail = f"--{boundary}--\r\n".encode()
    part_overhead = len(attachment_part(boundary, names[0], b""))
    budget = spec.size - len(head) - len(tail) - part_overhead * len(names)
    if budget < 78 * len(names):
        raise ValueError(f"{spec.size} octets is too small for the attachments")
    first = budget if len(names) == 1 else budget * rng.randint(35, 65) // 100
    shares = [first, budget - first][: len(names)]
    parts = [head]
    for name, share in zip(names, shares, strict=True):
        raw = share * 57 // 78
        while encoded_length(raw) > share:
            raw -= 1
        parts.append(attachment_part(boundary, name, rng.randbytes(raw)))
    return b"".join(parts) + tail


@dataclass(frozen=True)
class Sent:
    """What was sent of one message: its length and SHA-256."""

    length: int
    sha256: bytes


class Mismatch(AssertionError):
    pass


_FIELD = re.compile(rb"([!-9;-~]+):")  # a field name (RFC 5322 section 3.6.8)


def check_fetched(got: bytes, sent: Sent, spec: Spec) -> int:
    """Checks that ``got`` is the sent message behind mtad's trace fields:
    it ends with exactly the sent octets and what precedes them is only
    fields in :data:`PREPENDED` (with their folded lines). Returns the
    prefix's length; raises :class:`Mismatch`."""
    if len(got) < sent.length:
        raise Mismatch(f"{spec}: {len(got)} octets back, {sent.length} sent")
    prefix_len = len(got) - sent.length
    if hashlib.sha256(memoryview(got)[prefix_len:]).digest() != sent.sha256:
        at = first_difference(got[prefix_len:], message(spec))
        raise Mismatch(f"{spec}: the octets back differ from those sent at offset {at}")
    prefix = got[:prefix_len]
    if prefix and not prefix.endswith(b"\r\n"):
        raise Mismatch(f"{spec}: prepended text does not end in CRLF: {prefix[-80:]!r}")
    for line in prefix.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            continue  # a folded line (RFC 5322 section 2.2.3)
        name = _FIELD.match(line)
        if name is None or name.group(1).lower() not in PREPENDED:
            raise Mismatch(f"{spec}: prepended line is not a trace field: {line[:80]!r}")
    return prefix_len


def first_difference(a: bytes, b: bytes) -> int:
    """The first offset where ``a`` and ``b`` differ (the shorter's length
    when one is a prefix of the other)."""
    low, high = 0, min(len(a), len(b))
    while low < high:  # binary search on equal prefixes, no byte loop
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


# ----------------------------------------------------------------- servers


@dataclass
class Site:
    """One blob backend's site: data dir and the settings of its daemons."""

    backend: str
    data_dir: Path
    overrides: list[str]


def prepare_site(site: Site) -> None:
    """The domain and the two accounts (bench and warm-up)."""
    from conf.settings import load_settings
    from storage import open_storage

    async def run() -> None:
        settings = load_settings(overrides=[f"server.data_dir='{site.data_dir}'", *site.overrides])
        store = await open_storage(settings.storage)
        try:
            await store.directory.add_domain(RCPT.rpartition("@")[2])
            for login in (RCPT, WARM_RCPT):
                await store.directory.add_account(login, PASSWORD)
        finally:
            await store.close()

    site.data_dir.mkdir(parents=True)
    asyncio.run(run())


@dataclass
class Daemons:
    """mtad and imapd of one batch: their processes and ports."""

    mtad: subprocess.Popen[bytes]
    imapd: subprocess.Popen[bytes]
    smtp: int
    imap: int
    pop3: int


def start_daemon(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Starts ``argv`` with its output in ``log``; returns once it logged
    "shardmail ready" (raises with the log's tail if it exits first)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    try:
        while b"shardmail ready" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{argv[2]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
    except BaseException:  # not started, or interrupted while starting
        proc.kill()
        proc.wait()
        raise
    return proc


@contextlib.contextmanager
def daemons(site: Site, dns_port: int, sessions: int, checks: bool) -> Iterator[Daemons]:
    """mtad and imapd on ``site`` (no metrics listener, plaintext login);
    mtad's SPF and DKIM checks on only with ``checks``."""
    common = ["server.metrics_listen=[]", *site.overrides]
    smtp, imap, pop3 = free_port(), free_port(), free_port()
    argv = mtad_argv(site.data_dir, smtp, dns_port, sessions + 2, spf_dkim=checks)
    for override in common:
        argv += ["-o", override]
    imapd_argv = [sys.executable, "-m", "imapd"]
    for override in [
        f"server.data_dir='{site.data_dir}'",
        "server.log_level='WARNING'",
        f"imap.listen=['127.0.0.1:{imap}']",
        f"imap.tls_listen=['127.0.0.1:{free_port()}']",
        f"pop3.listen=['127.0.0.1:{pop3}']",
        f"pop3.tls_listen=['127.0.0.1:{free_port()}']",
        "auth.allow_plaintext=true",
        *common,
    ]:
        imapd_argv += ["-o", override]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_daemon(argv, site.data_dir / "mtad.log"))
        procs.append(start_daemon(imapd_argv, site.data_dir / "imapd.log"))
        yield Daemons(procs[0], procs[1], smtp, imap, pop3)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ----------------------------------------------------------------- clients


def run_sessions(count: int, work: Callable[[int], object]) -> float:
    """Runs ``work(i)`` for i in range(count) on as many threads; the wall
    time. An exception in one is raised here."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        for done in [pool.submit(work, i) for i in range(count)]:
            done.result()
    return time.perf_counter() - start


def smtp_send(port: int, messages: Sequence[bytes], rcpt: str = RCPT) -> None:
    """One SMTP session delivering ``messages``; each must be accepted."""
    with smtplib.SMTP("127.0.0.1", port, "bench.example", timeout=300) as client:
        for data in messages:
            refused = client.sendmail(SENDER, [rcpt], data)
            if refused:
                raise SystemExit(f"refused: {refused}")


def imap_login(port: int, login: str = RCPT) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=300)
    client.login(login, PASSWORD)
    client.select("INBOX")
    return client


def fetch_literal(client: imaplib.IMAP4, uid: int, item: str) -> bytes:
    """The literal of ``UID FETCH uid (item)`` (RFC 9051 section 6.4.5)."""
    typ, data = client.uid("FETCH", str(uid), f"({item})")
    literals = [part[1] for part in data if isinstance(part, tuple)]
    if typ != "OK" or len(literals) != 1:
        raise SystemExit(f"UID FETCH {uid} {item}: {typ} {data!r:.300}")
    return literals[0]


def uids_by_message_id(port: int, login: str = RCPT) -> dict[str, int]:
    """Message-ID -> UID of every message in ``login``'s INBOX."""
    client = imap_login(port, login)
    try:
        _, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        found: dict[str, int] = {}
        for part in data:
            if isinstance(part, tuple):
                uid = re.search(rb"UID (\d+)", part[0])
                mid = re.search(rb"<[^>]+>", part[1])
                if uid and mid:
                    found[mid.group().decode()] = int(uid.group(1))
        return found
    finally:
        client.logout()


def expunge_all(port: int, login: str = RCPT) -> None:
    client = imap_login(port, login)
    try:
        _, found = client.uid("SEARCH", "ALL")
        if found and found[0]:
            client.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Deleted)")
            client.expunge()
    finally:
        client.logout()


def pop3_login(port: int, login: str = RCPT) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=300)
    client.user(login)
    client.pass_(PASSWORD)
    return client


def pop3_retr_each(client: poplib.POP3, check: Callable[[bytes], None]) -> int:
    """RETRs every message of the session's maildrop (numbers 1 to STAT's
    count, RFC 1939 section 5), handing each to ``check`` as it arrives,
    dot-stuffing undone by poplib (none is kept); then QUIT. Returns the
    octets retrieved."""
    octets = 0
    try:
        for number in range(1, client.stat()[0] + 1):
            got = b"\r\n".join(client.retr(number)[1]) + b"\r\n"
            octets += len(got)
            check(got)
    finally:
        client.quit()
    return octets


# ------------------------------------------------------------------- batch


@dataclass
class Phase:
    """One phase of one batch: octets and messages moved, wall time, the
    serving process's CPU with its content workers' (and Swift's), its
    memory, and apart its content workers' memory."""

    octets: int
    messages: int
    elapsed: float
    cpu: float
    memory: Memory
    swift_cpu: float = 0.0
    workers: Memory | None = None  # the serving process's content workers


@dataclass
class Batch:
    backend: str
    size: int
    round: int
    ingest: Phase
    fetch: Phase
    pop3: Phase
    partial_ms: list[float] = field(default_factory=list)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (content workers)."""
    total = cpu_seconds(pid)
    for child in children(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(child)
    return total


@contextlib.contextmanager
def sampled(pid: int, sessions: int) -> Iterator[tuple[RssSampler, RssSampler]]:
    """Samplers of ``pid`` alone and of its content workers together."""
    with RssSampler([pid], sessions) as main, RssSampler(children(pid), sessions) as workers:
        yield main, workers


def swift_cpu_seconds(swift: SwiftServer | None) -> float:
    """CPU seconds of Swift's proxy, account, container and object
    servers (each leads its own process group); 0 without Swift."""
    if swift is None:
        return 0.0
    return sum(process_group_cpu_seconds(p.pid) for p in swift.procs.values())


def warm_up(d: Daemons) -> None:
    """One 2 MB message (past smtp.spool_threshold, 1 MiB: the spool's
    first use is slow) to the warm-up account: delivered, fetched whole
    and in part, retrieved and expunged (not counted)."""
    spec = Spec("warm", 2 * MB, 0)
    data = message(spec, WARM_RCPT)
    smtp_send(d.smtp, [data], WARM_RCPT)
    (uid,) = uids_by_message_id(d.imap, WARM_RCPT).values()
    client = imap_login(d.imap, WARM_RCPT)
    try:
        sent = Sent(len(data), hashlib.sha256(data).digest())
        check_fetched(fetch_literal(client, uid, "BODY.PEEK[]"), sent, spec)
        fetch_literal(client, uid, "BODY.PEEK[]<1000.50000>")
    finally:
        client.logout()
    pop3_retr_each(pop3_login(d.pop3, WARM_RCPT), lambda got: check_fetched(got, sent, spec))
    expunge_all(d.imap, WARM_RCPT)


def run_batch(
    site: Site,
    size: int,
    rnd: int,
    args: argparse.Namespace,
    dns_port: int,
    swift: SwiftServer | None,
) -> Batch:
    """One batch (module docstring, steps 1 to 5); ``swift``'s CPU is
    counted when given (on the s3 site)."""
    specs = [Spec(f"{site.backend}{rnd}", size, n) for n in range(args.messages)]
    sessions = min(args.sessions, len(specs))
    with daemons(site, dns_port, sessions, args.checks) as d:
        warm_up(d)
        time.sleep(0.5)  # the warm-up's last writes and log lines
        # Ingest: the messages made beforehand, then only what is sent.
        batch = [message(spec) for spec in specs]
        sent = {
            s.message_id: Sent(len(m), hashlib.sha256(m).digest())
            for s, m in zip(specs, batch, strict=True)
        }
        cpu0, swift0 = tree_cpu_seconds(d.mtad.pid), swift_cpu_seconds(swift)
        with sampled(d.mtad.pid, sessions) as (sampler, workers):
            elapsed = run_sessions(sessions, lambda i: smtp_send(d.smtp, batch[i::sessions]))
        octets = sum(len(m) for m in batch)
        batch.clear()  # 150 MB at 6 x 25 MB: not kept through FETCH
        assert sampler.memory is not None
        ingest = Phase(
            octets, len(specs), elapsed, tree_cpu_seconds(d.mtad.pid) - cpu0, sampler.memory,
            swift_cpu_seconds(swift) - swift0, workers.memory,
        )  # fmt: skip
        # FETCH of each message whole, over concurrent sessions.
        uids = uids_by_message_id(d.imap)
        if sorted(uids) != sorted(sent):
            raise SystemExit(f"INBOX holds {sorted(uids)}, sent {sorted(sent)}")
        by_spec = [(spec, uids[spec.message_id]) for spec in specs]
        prefixes: dict[str, int] = {}
        clients = [imap_login(d.imap) for _ in range(sessions)]

        def fetch_share(i: int) -> None:
            for spec, uid in by_spec[i::sessions]:
                got = fetch_literal(clients[i], uid, "BODY.PEEK[]")
                prefixes[spec.message_id] = check_fetched(got, sent[spec.message_id], spec)

        cpu0, swift0 = tree_cpu_seconds(d.imapd.pid), swift_cpu_seconds(swift)
        with sampled(d.imapd.pid, sessions) as (sampler, workers):
            elapsed = run_sessions(sessions, fetch_share)
        assert sampler.memory is not None and len(prefixes) == len(specs)
        fetched = sum(sent[s.message_id].length + prefixes[s.message_id] for s in specs)
        fetch = Phase(
            fetched, len(specs), elapsed, tree_cpu_seconds(d.imapd.pid) - cpu0, sampler.memory,
            swift_cpu_seconds(swift) - swift0, workers.memory,
        )  # fmt: skip
        partial_ms = []
        for spec, uid in by_spec[:PARTIALS]:
            total = sent[spec.message_id].length + prefixes[spec.message_id]
            start = max(0, total // 2 - PARTIAL // 2)
            began = time.perf_counter()
            got = fetch_literal(clients[0], uid, f"BODY.PEEK[]<{start}.{PARTIAL}>")
            partial_ms.append(1000 * (time.perf_counter() - began))
            # The prefix is trace text; the range is checked against the
            # regenerated message behind a prefix of the same length.
            prefix = fetch_literal(clients[0], uid, f"BODY.PEEK[]<0.{prefixes[spec.message_id]}>")
            expected = (prefix + message(spec))[start : start + PARTIAL]
            if got != expected:
                at = first_difference(got, expected)
                raise Mismatch(f"{spec}: partial fetch at {start} differs at offset {at}")
        for client in clients:
            client.logout()
        # POP3 RETR of every message, one session.
        # Logged in first: a login's password check (Argon2, 64 MiB) is
        # no part of a session's memory for the messages.
        pop3_client = pop3_login(d.pop3)
        by_id = {spec.message_id: spec for spec in specs}
        retrieved: list[str] = []

        def check_retrieved(got: bytes) -> None:
            mid = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", got)
            spec = by_id.get(mid.group(1).decode()) if mid else None
            if spec is None:
                raise Mismatch(f"POP3: a message of none of the batch's Message-IDs: {mid}")
            check_fetched(got, sent[spec.message_id], spec)
            retrieved.append(spec.message_id)

        cpu0, swift0 = tree_cpu_seconds(d.imapd.pid), swift_cpu_seconds(swift)
        with sampled(d.imapd.pid, 1) as (sampler, workers):
            began = time.perf_counter()
            octets = pop3_retr_each(pop3_client, check_retrieved)
            elapsed = time.perf_counter() - began
        assert sampler.memory is not None
        if sorted(retrieved) != sorted(by_id):
            raise SystemExit(f"POP3: retrieved {sorted(retrieved)}, sent {sorted(by_id)}")
        pop3 = Phase(
            octets, len(retrieved), elapsed, tree_cpu_seconds(d.imapd.pid) - cpu0, sampler.memory,
            swift_cpu_seconds(swift) - swift0, workers.memory,
        )  # fmt: skip
        expunge_all(d.imap)
    return Batch(site.backend, size, rnd, ingest, fetch, pop3, partial_ms)


# ------------------------------------------------------------------ report


def memory_text(m: Memory) -> str:
    return (
        f"+{m.per_session_mb():.1f} MB/session (anon +{m.anon_per_session_mb():.1f}; "
        f"idle {m.idle / 1024:.0f} MiB, peak {m.peak / 1024:.0f})"
    )


def workers_text(p: Phase) -> str:
    return f"+{p.workers.per_session_mb():.1f}" if p.workers and p.workers.sessions else "none"


def batch_line(b: Batch) -> str:
    mb = b.ingest.octets / MB
    return (
        f"round {b.round + 1} {b.backend} {b.size / MB:>4.0f} MB: "
        f"ingest {b.ingest.messages / b.ingest.elapsed:.2f} msg/s {mb / b.ingest.elapsed:.1f} MB/s "
        f"mtad {1000 * b.ingest.cpu / mb:.1f} ms/MB {memory_text(b.ingest.memory)} "
        f"workers {workers_text(b.ingest)}; "
        f"FETCH {b.fetch.octets / MB / b.fetch.elapsed:.1f} MB/s "
        f"imapd {1000 * b.fetch.cpu / (b.fetch.octets / MB):.1f} ms/MB "
        f"{memory_text(b.fetch.memory)} workers {workers_text(b.fetch)}; "
        f"partial {statistics.median(b.partial_ms):.0f} ms; "
        f"RETR {b.pop3.octets / MB / b.pop3.elapsed:.1f} MB/s {memory_text(b.pop3.memory)}"
    )


def rate(phases: Sequence[Phase]) -> float:
    return sum(p.octets for p in phases) / MB / sum(p.elapsed for p in phases)


def report(batches: Sequence[Batch], sessions: int) -> None:
    """Per backend and size over its rounds: rates over the summed time,
    CPU over the summed octets, memory per session the largest of the
    rounds, the partial fetch's median."""
    print(
        f"\n{'backend':<8}{'size':>6}{'msg/s':>8}{'MB/s':>7}{'mtad':>8}{'swift':>8}"
        f"{'mem/s':>8}{'anon':>7}{'wrk':>6}{'FETCH':>8}{'imapd':>8}{'swift':>8}{'mem/s':>8}{'anon':>7}"
        f"{'part':>7}{'RETR':>7}{'mem':>7}"
    )
    print(
        f"{'':<8}{'MB':>6}{'ingest':>8}{'':>7}{'ms/MB':>8}{'ms/MB':>8}{'MB':>8}{'MB':>7}{'MB':>6}"
        f"{'MB/s':>8}{'ms/MB':>8}{'ms/MB':>8}{'MB':>8}{'MB':>7}{'ms':>7}{'MB/s':>7}{'MB':>7}"
    )
    keys = sorted({(b.size, b.backend) for b in batches})
    for size, backend in keys:
        mine = [b for b in batches if (b.size, b.backend) == (size, backend)]
        ing = [b.ingest for b in mine]
        fet = [b.fetch for b in mine]
        ret = [b.pop3 for b in mine]
        mb_in = sum(p.octets for p in ing) / MB
        mb_out = sum(p.octets for p in fet) / MB
        print(
            f"{backend:<8}{size / MB:>6.0f}"
            f"{sum(p.messages for p in ing) / sum(p.elapsed for p in ing):>8.2f}"
            f"{rate(ing):>7.1f}"
            f"{1000 * sum(p.cpu for p in ing) / mb_in:>8.1f}"
            f"{1000 * sum(p.swift_cpu for p in ing) / mb_in:>8.1f}"
            f"{max(p.memory.per_session_mb() for p in ing):>8.1f}"
            f"{max(p.memory.anon_per_session_mb() for p in ing):>7.1f}"
            f"{max(p.workers.per_session_mb() if p.workers else 0 for p in ing):>6.1f}"
            f"{rate(fet):>8.1f}"
            f"{1000 * sum(p.cpu for p in fet) / mb_out:>8.1f}"
            f"{1000 * sum(p.swift_cpu for p in fet) / mb_out:>8.1f}"
            f"{max(p.memory.per_session_mb() for p in fet):>8.1f}"
            f"{max(p.memory.anon_per_session_mb() for p in fet):>7.1f}"
            f"{statistics.median([ms for b in mine for ms in b.partial_ms]):>7.0f}"
            f"{rate(ret):>7.1f}"
            f"{max(p.memory.per_session_mb() for p in ret):>7.1f}"
        )
    print(
        f"(mem/s: (peak - idle RSS) / {sessions} sessions, the largest of the rounds: "
        "mtad's during ingest, imapd's during FETCH; RETR: one session; "
        "anon: the same of RssAnon, mapped files left out; wrk: mtad's content "
        "workers' VmRSS, apart; CPU: each daemon with its content workers)"
    )


# -------------------------------------------------------------------- main


def _interrupted(signum: int, _frame: object) -> None:
    """SIGTERM (a ``timeout``, a ``kill``) unwinds as Ctrl-C does: the
    daemons, Swift and dnsmasq stop and the temporary sites go."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupted)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=6, help="per size, backend and round")
    parser.add_argument("--sessions", type=int, default=3, help="concurrent SMTP/IMAP sessions")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--sizes", default="1,10,25", help="message sizes in MB (10^6 octets), comma-separated"
    )
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--checks",
        action="store_true",
        help="keep mtad's SPF and DKIM checks on (the defaults; off otherwise, as smtp_bench)",
    )
    args = parser.parse_args()
    sizes = [round(float(s) * MB) for s in args.sizes.split(",")]
    backends = args.backends.split(",")
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bigmsg-bench-"))
    swift = dns = None
    try:
        if "s3" in backends:
            swift = SwiftServer.start()
        dns = start_dns_server(Zone())
        sites = {}
        for backend in backends:
            overrides = []
            if backend == "s3":
                assert swift is not None
                overrides = [f"storage.blob_url='{swift.blob_url(f'bigmsg-{os.getpid()}')}'"]
            sites[backend] = Site(backend, tmp / backend, overrides)
            prepare_site(sites[backend])
        batches = []
        for rnd in range(args.rounds):
            order = backends if rnd % 2 == 0 else backends[::-1]
            for size in sizes:
                for backend in order:
                    b = run_batch(
                        sites[backend], size, rnd, args, dns.port,
                        swift if backend == "s3" else None,
                    )  # fmt: skip
                    batches.append(b)
                    print(batch_line(b), flush=True)
        report(batches, args.sessions)
        if not all(p.memory.hwm_reset for b in batches for p in (b.ingest, b.fetch, b.pop3)):
            print("VmHWM could not be reset (clear_refs): peaks are the 10 ms samples only")
        print(
            f"all {sum(b.fetch.messages for b in batches)} messages checked byte-exact "
            "(FETCH, partial FETCH and RETR)"
        )
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if dns is not None:
            stop_dns_server(dns)
        if swift is not None:
            swift.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
