"""The scaled setup of issue #19 on loopback, as separate processes.

PostgreSQL servers: "dir" (the directory database), "a" (shard a, with a
synchronous streaming replica "a_replica", listed in the shard's
``replicas`` as docs/failover.md says) and "b" (shard b); one Redis (shared
limits, login-failure counts and the event bus); two instances of each
daemon (``mailctl serve --only mtad|imapd|httpapi``), each with its own
ports and data dir, all reading one ``shardmail.toml``. Administration goes
through the ``mailctl`` CLI with the same file, as an operator's would.

Clients are the standard library's (smtplib, imaplib); :class:`Ledger`
writes down what each SMTP transaction was told, per Message-ID, and
:meth:`Cluster.message_ids` reads a mailbox back over IMAP, so that a drill
can check that every acknowledged message is there exactly once.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import loopback_dns
from tests.integration.smtp.test_smtp_failover import _close, _reset
from tests.integration.smtp.test_smtp_failover import _message as message
from tests.pgserver import PgServer
from tests.ports import free_port
from tests.redisserver import RedisServer

REPO = Path(__file__).resolve().parents[2]
DATABASE = "mail"  # the database's name on every PostgreSQL server
DOMAIN = "cluster.test"
PASSWORD = "cluster drill password"
SENDER = "drill@remote.example"
# Long enough that one counted login failure shows in the next login's time.
FAILURE_DELAY = 3.0
START_TIMEOUT = 60.0
LISTEN_KEYS = {
    "mtad": ("smtp.mx_listen", "smtp.submission_listen", "smtp.submissions_listen"),
    "imapd": ("imap.listen", "imap.tls_listen", "pop3.listen", "pop3.tls_listen"),
    "httpapi": ("http.listen",),
}
# The port a client uses for each daemon (and that tells it has started).
MAIN_KEY = {"mtad": "smtp.mx_listen", "imapd": "imap.listen", "httpapi": "http.listen"}
MESSAGE_ID = re.compile(rb"Message-ID:\s*<([^>]+)>", re.IGNORECASE)


def port_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Polls ``condition`` every 50 ms; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Instance:
    """One daemon process: ``mailctl serve --only DAEMON`` with its own ports."""

    daemon: str
    index: int
    data_dir: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.daemon}{self.index}"

    @property
    def port(self) -> int:
        return self.ports[MAIN_KEY[self.daemon]]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    root: Path
    config: Path
    pg: dict[str, PgServer]
    redis: RedisServer
    instances: dict[str, Instance] = field(default_factory=dict)

    # --- processes ---------------------------------------------------------

    def start(self, *instances: Instance) -> None:
        """Starts ``instances`` (at once: each spends seconds importing) and
        returns once every main port answers."""
        for instance in instances:
            self._spawn(instance)
        deadline = time.monotonic() + START_TIMEOUT
        for instance in instances:
            assert instance.proc is not None
            while not port_answers(instance.port):
                if instance.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{instance.name} did not start:\n{self.log(instance)}")
                time.sleep(0.1)

    def _spawn(self, instance: Instance) -> None:
        argv = [sys.executable, "-m", "mailctl.cli", "serve", "--only", instance.daemon]
        argv += ["-c", str(self.config), "-o", f"server.data_dir='{instance.data_dir}'"]
        for key, port in instance.ports.items():
            argv += ["-o", f"{key}=['127.0.0.1:{port}']"]
        log = (self.root / f"{instance.name}.log").open("ab")
        try:
            instance.proc = subprocess.Popen(
                argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    def kill(self, instance: Instance) -> None:
        """SIGKILL, as a crash of its host would."""
        assert instance.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(instance.proc.pid, signal.SIGKILL)
        instance.proc.wait()

    def stop(self, instance: Instance) -> None:
        """SIGTERM, then SIGKILL if it has not stopped within 15 s."""
        if not instance.alive():
            return
        assert instance.proc is not None
        instance.proc.terminate()
        try:
            instance.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill(instance)

    def log(self, instance: Instance) -> str:
        return (self.root / f"{instance.name}.log").read_text(errors="replace")[-4000:]

    def ensure_running(self) -> None:
        """Restarts any instance a drill left stopped."""
        self.start(*[i for i in self.instances.values() if not i.alive()])

    def ports(self, daemon: str) -> list[int]:
        return [i.port for i in self.instances.values() if i.daemon == daemon]

    def mailctl(self, *args: str, stdin: str = "", timeout: float = 120) -> str:
        """Runs ``mailctl -c CONFIG ARGS``; its stdout, or AssertionError with stderr."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailctl.cli", "-c", str(self.config), *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            # What it said so far (a move's progress) and, from SIGABRT with
            # the fault handler on, where each of its threads was waiting.
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            raise AssertionError(
                f"mailctl {' '.join(args)}: still running after {timeout} s\n{out}\n{err}"
            ) from None
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if done.returncode != 0:
            raise AssertionError(f"mailctl {' '.join(args)}: {done.returncode}\n{done.stderr}")
        return done.stdout

    def kill_mailctl_at(self, state: str, *args: str) -> str:
        """Runs ``mailctl ARGS`` (a move) and SIGKILLs it as soon as it
        reports entering ``state`` (its progress lines); the lines seen."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailctl.cli", "-c", str(self.config), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        seen = []
        try:
            for line in proc.stdout:
                seen.append(line.decode(errors="replace"))
                if f": {state}" in seen[-1]:
                    proc.kill()
                    break
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, f"it ended before {state}: {seen}"
        return "".join(seen)

    def add_accounts(self, shards: dict[str, str]) -> None:
        """Creates address -> shard accounts, one ``mailctl account add`` each, at once."""
        with ThreadPoolExecutor(len(shards) or 1) as pool:
            for done in [
                pool.submit(
                    self.mailctl,
                    "account",
                    "add",
                    address,
                    "--shard",
                    shard,
                    "--password-stdin",
                    stdin=PASSWORD + "\n",
                )
                for address, shard in shards.items()
            ]:
                done.result()

    # --- PostgreSQL --------------------------------------------------------

    def stop_pg(self, name: str) -> None:
        """A fast shutdown of one server (its sessions end), files kept."""
        self.pg[name].shutdown()

    def start_pg(self, name: str) -> None:
        self.pg[name].restart()

    def shards_holding(self, address: str) -> list[str]:
        """The shards whose database holds mailboxes of ``address``, read
        straight from PostgreSQL (a mover's tombstone counters row is no mail)."""
        account_id = self.pg["dir"].sql(
            f"SELECT id FROM accounts WHERE address = '{address}'", database=DATABASE
        )
        return [
            shard
            for shard in ("a", "b")
            if int(
                self.pg[shard].sql(
                    f"SELECT count(*) FROM mailboxes WHERE account_id = {int(account_id)}",
                    database=DATABASE,
                )
            )
        ]

    def directory_shard(self, address: str) -> str:
        return self.pg["dir"].sql(
            f"SELECT shard FROM accounts WHERE address = '{address}'", database=DATABASE
        )

    # --- IMAP --------------------------------------------------------------

    def imap(self, address: str, port: int | None = None) -> imaplib.IMAP4:
        """A logged-in IMAP session on ``port`` (default: the first live imapd)."""
        conn = imaplib.IMAP4("127.0.0.1", port or self.ports("imapd")[0], timeout=30)
        try:
            conn.login(address, PASSWORD)
        except BaseException:
            with contextlib.suppress(Exception):
                conn.shutdown()
            raise
        return conn

    def message_ids(self, address: str) -> Counter[str]:
        """How many times each Message-ID is in ``address``'s INBOX, read over
        IMAP (RFC 3501 section 6.4.5, BODY.PEEK leaves \\Seen alone)."""
        conn = self.imap(address)
        try:
            typ, data = conn.select("INBOX", readonly=True)
            assert typ == "OK", data
            found: Counter[str] = Counter()
            if int(data[0] or 0) == 0:
                return found
            typ, data = conn.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            assert typ == "OK", data
            for item in data:
                if isinstance(item, tuple):
                    match = MESSAGE_ID.search(item[1])
                    assert match is not None, item
                    found[match.group(1).decode()] += 1
            return found
        finally:
            conn.logout()


@dataclass
class Ledger:
    """What the SMTP clients were told, per Message-ID."""

    acked: dict[str, str] = field(default_factory=dict)  # Message-ID -> recipient
    refused: list[tuple[str, str, int, bytes]] = field(default_factory=list)  # id, rcpt, code
    unanswered: dict[str, str] = field(default_factory=dict)  # connection lost: maybe stored
    acked_at: list[tuple[float, str]] = field(default_factory=list)  # (when, rcpt)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acked_since(self, moment: float, rcpt: str | None = None) -> int:
        with self.lock:
            return sum(t > moment and rcpt in (None, to) for t, to in self.acked_at)

    def refusals(self, rcpts: set[str] | None = None) -> list[tuple[str, str, int, bytes]]:
        with self.lock:
            return [r for r in self.refused if rcpts is None or r[1] in rcpts]

    def check(self, cluster: Cluster, rcpts: set[str]) -> None:
        """Every acknowledged message to ``rcpts`` is in its INBOX exactly
        once; nothing is there that no client sent; no 5xx was given."""
        assert all(400 <= code < 500 for _, _, code, _ in self.refused), self.refused
        for rcpt in sorted(rcpts):
            stored = cluster.message_ids(rcpt)
            acked = {mid for mid, to in self.acked.items() if to == rcpt}
            maybe = {mid for mid, to in self.unanswered.items() if to == rcpt}
            missing = acked - set(stored)
            assert not missing, f"{rcpt}: {len(missing)} of {len(acked)} acknowledged lost"
            twice = {mid: n for mid, n in stored.items() if n > 1 and mid in acked}
            assert not twice, f"{rcpt}: stored more than once: {twice}"
            refused = {mid for mid, to, _, _ in self.refused if to == rcpt}
            ours = {mid for mid in stored if mid.endswith("@drill.test")}
            assert ours <= acked | maybe, f"{rcpt}: refused yet stored: {ours & refused}"


class SmtpLoad:
    """Threads sending one message per transaction to random ``rcpts`` over
    the MX ports of every mtad, moving to the next instance after any
    failure (as a sending MTA tries the next MX), until :meth:`stop`."""

    def __init__(self, cluster: Cluster, rcpts: list[str], clients: int = 3) -> None:
        self.cluster = cluster
        self.rcpts = rcpts
        self.ledger = Ledger()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)
        ]

    def __enter__(self) -> SmtpLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def wait_acked(
        self, count: int, timeout: float = 60.0, since: float = 0.0, rcpt: str | None = None
    ) -> None:
        wait_until(
            lambda: self.ledger.acked_since(since, rcpt) >= count,
            timeout,
            f"{count} messages to {rcpt or 'anyone'} acked",
        )

    def _run(self, slot: int) -> None:
        ports = self.cluster.ports("mtad")
        turn = slot
        smtp: smtplib.SMTP | None = None
        while not self._stop.is_set():
            message_id = f"{uuid.uuid4().hex}@drill.test"
            rcpt = random.choice(self.rcpts)
            try:
                if smtp is None:
                    smtp = smtplib.SMTP(
                        "127.0.0.1", ports[turn % len(ports)], "client.example", timeout=20
                    )
                smtp.sendmail(SENDER, [rcpt], message(message_id, rcpt))
            except smtplib.SMTPRecipientsRefused as exc:
                self._record(refused=(message_id, rcpt, *exc.recipients[rcpt]))
                smtp = _reset(smtp)
                time.sleep(0.05)
            except smtplib.SMTPResponseException as exc:
                self._record(refused=(message_id, rcpt, exc.smtp_code, exc.smtp_error))
                smtp = _reset(smtp)
                time.sleep(0.05)
            except (smtplib.SMTPException, OSError):
                self._record(unanswered=(message_id, rcpt))
                smtp = _close(smtp)
                turn += 1  # the next instance
                time.sleep(0.05)
            else:
                self._record(acked=(message_id, rcpt))
        _close(smtp)

    def _record(
        self,
        acked: tuple[str, str] | None = None,
        refused: tuple[str, str, int, bytes] | None = None,
        unanswered: tuple[str, str] | None = None,
    ) -> None:
        with self.ledger.lock:
            if acked:
                self.ledger.acked[acked[0]] = acked[1]
                self.ledger.acked_at.append((time.monotonic(), acked[1]))
            if refused:
                self.ledger.refused.append(refused)
            if unanswered:
                self.ledger.unanswered[unanswered[0]] = unanswered[1]


def deliver(port: int, rcpt: str) -> tuple[int, bytes]:
    """One message to ``rcpt``: (250, b"") or the first refusal's reply."""
    raw = message(f"{uuid.uuid4().hex}@probe.test", rcpt)
    with smtplib.SMTP("127.0.0.1", port, "client.example", timeout=30) as smtp:
        try:
            smtp.sendmail(SENDER, [rcpt], raw)
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients[rcpt]
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, exc.smtp_error
    return 250, b""


# --- building it ---------------------------------------------------------


def _config_text(root: Path, pg: dict[str, PgServer], redis: RedisServer) -> str:
    dns = loopback_dns()
    return f"""\
[server]
hostname = "mail.cluster.test"
data_dir = "{root / "data"}"
metrics_listen = []
content_workers = 0

[dns]
nameservers = {dns["nameservers"]!r}
port = {dns["port"]}
timeout_seconds = 2.0

[auth]
allow_plaintext = true
failure_delay_seconds = {FAILURE_DELAY}
failure_delay_max_seconds = {FAILURE_DELAY * 2}
argon2_time_cost = 1
argon2_memory_kib = 64
argon2_parallelism = 1

[smtp]
# The drills send thousands of messages from 127.0.0.1: the site-wide
# (Redis) limits would refuse them. tests/integration/test_shared_limits.py
# checks those limits across instances.
rate_limit_per_user = 0
rate_limit_per_ip = 0
spf = false
dkim_verify = false
dmarc = false

[http]
rate_limit_per_user = 0
rate_limit_per_ip = 0

[storage]
url = "{pg["dir"].url(DATABASE)}"
blob_dir = "{root / "blobs"}"
events = "redis"

[storage.shards.a]
url = "{pg["a"].url(DATABASE)}"
replicas = ["{pg["a_replica"].url(DATABASE)}"]

[storage.shards.b]
url = "{pg["b"].url(DATABASE)}"

[redis]
url = "{redis.url}"
"""


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Starts everything (a failure to start fails the suite: no skip) and
    stops it all at the end, removing its files."""
    root = Path(tempfile.mkdtemp(prefix="shardmail-cluster-"))
    pg: dict[str, PgServer] = {}
    redis: RedisServer | None = None
    cluster: Cluster | None = None
    try:
        with ThreadPoolExecutor(3) as pool:
            # Shard a is durable: its SIGKILL drill loses nothing acknowledged.
            started = {
                "dir": pool.submit(PgServer.start),
                "a": pool.submit(PgServer.start, durable=True),
                "b": pool.submit(PgServer.start),
            }
            failed: list[BaseException] = []
            for name, future in started.items():
                try:
                    pg[name] = future.result()
                except Exception as exc:  # the others still get stopped below
                    failed.append(exc)
            if failed:
                raise failed[0]
        for name in ("dir", "a", "b"):
            pg[name].sql(f"CREATE DATABASE {DATABASE}")
        pg["a_replica"] = pg["a"].start_replica(synchronous=True)
        pg["a_replica"].wait_replayed(pg["a"])
        redis = RedisServer.start()
        config = root / "shardmail.toml"
        config.write_text(_config_text(root, pg, redis))
        cluster = Cluster(root, config, pg, redis)
        cluster.mailctl("domain", "add", DOMAIN)  # creates every schema
        for daemon, keys in LISTEN_KEYS.items():
            for index in (1, 2):
                instance = Instance(
                    daemon, index, root / f"data-{daemon}{index}", {k: free_port() for k in keys}
                )
                cluster.instances[instance.name] = instance
        cluster.start(*cluster.instances.values())
        yield cluster
    finally:
        if cluster is not None:
            for instance in cluster.instances.values():
                cluster.stop(instance)
        if redis is not None:
            redis.stop()
        for server in reversed(list(pg.values())):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- reader load ---------------------------------------------------------


def http_json(
    port: int, method: str, path: str, body: object = None, token: str = ""
) -> tuple[int, object]:
    """One HTTP API request: (status, parsed JSON body or None)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(exc.read() or b"null")
        return exc.code, None


class ReaderLoad:
    """A thread that reads ``address``'s mailbox over and over through one
    daemon's instances (IMAP: LOGIN, SELECT, FETCH; HTTP: login, folders),
    staying on an instance while it answers and moving to the next after
    any failure, as a client with two servers in its DNS would. Records
    each success's (time, port) and each failure."""

    def __init__(self, cluster: Cluster, daemon: str, address: str) -> None:
        self.cluster, self.daemon, self.address = cluster, daemon, address
        self.ok: list[tuple[float, int]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ReaderLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def served_since(self, moment: float, port: int | None = None) -> int:
        return sum(t > moment and port in (None, p) for t, p in list(self.ok))

    def _run(self) -> None:
        ports = self.cluster.ports(self.daemon)
        turn = 0
        while not self._stop.is_set():
            port = ports[turn % len(ports)]
            try:
                if self.daemon == "imapd":
                    self._imap_round(port)
                else:
                    self._http_round(port)
            except (imaplib.IMAP4.error, OSError, AssertionError, ValueError) as exc:
                self.failures.append(f"{port}: {exc!r}")
                turn += 1
                time.sleep(0.05)

    def _imap_round(self, port: int) -> None:
        conn = self.cluster.imap(self.address, port)
        try:
            while not self._stop.is_set():
                typ, data = conn.select("INBOX", readonly=True)
                assert typ == "OK", data
                if int(data[0] or 0):
                    typ, data = conn.fetch("1:*", "(UID FLAGS)")
                    assert typ == "OK", data
                self.ok.append((time.monotonic(), port))
                time.sleep(0.05)
        finally:
            with contextlib.suppress(Exception):
                conn.logout()

    def _http_round(self, port: int) -> None:
        status, body = http_json(
            port, "POST", "/v1/login", {"address": self.address, "password": PASSWORD}
        )
        assert status == 200 and isinstance(body, dict), (status, body)
        token = body["token"]
        while not self._stop.is_set():
            status, body = http_json(port, "GET", "/v1/folders", token=token)
            assert status == 200, (status, body)
            self.ok.append((time.monotonic(), port))
            time.sleep(0.05)


def import_mbox(cluster: Cluster, address: str, count: int) -> set[str]:
    """Imports ``count`` messages of random sizes into ``address``'s INBOX
    with ``mailctl import mbox``; their Message-IDs."""
    ids = {f"{uuid.uuid4().hex}@import.test" for _ in range(count)}
    path = cluster.root / f"{uuid.uuid4().hex}.mbox"
    with path.open("wb") as mbox:
        for message_id in ids:
            raw = message(message_id, address).replace(b"\r\n", b"\n")
            # mboxrd: a body line starting with "From " (or ">From ") gains a ">".
            raw = re.sub(rb"^(>*From )", rb">\1", raw, flags=re.MULTILINE)
            mbox.write(b"From drill@remote.example Sat Dec  5 12:00:00 2026\n" + raw + b"\n")
    cluster.mailctl("import", "mbox", address, "--from", str(path), "-q", timeout=300)
    path.unlink()
    return ids


class IdleClient:
    """An IMAP client IDLE in ``address``'s INBOX (RFC 2177), with QRESYNC
    enabled (RFC 7162 section 3.2.3). When the server ends the session it
    reconnects (to the next imapd) and SELECTs again with the UIDVALIDITY
    and HIGHESTMODSEQ it last knew, as a resyncing client does; every
    SELECT's (UIDVALIDITY, HIGHESTMODSEQ) and every BYE are recorded."""

    def __init__(self, cluster: Cluster, address: str) -> None:
        self.cluster, self.address = cluster, address
        self.selects: list[tuple[int, int]] = []
        self.byes: list[bytes] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> IdleClient:
        self._thread.start()
        wait_until(lambda: bool(self.selects), 60, "the IDLE client's first SELECT")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        ports = self.cluster.ports("imapd")
        turn = 0
        while not self._stop.is_set():
            try:
                self._session(ports[turn % len(ports)])
            except (imaplib.IMAP4.error, OSError, AssertionError) as exc:
                self.errors.append(repr(exc))
                time.sleep(0.1)
            turn += 1

    def _session(self, port: int) -> None:
        conn = self.cluster.imap(self.address, port)
        try:
            conn.enable("QRESYNC")
            self.selects.append(qresync_select(conn, self.selects[-1] if self.selects else None))
            tag = conn._new_tag()  # imaplib has no IDLE before Python 3.14
            conn.send(tag + b" IDLE\r\n")
            assert conn.readline().startswith(b"+"), "IDLE refused"
            conn.sock.settimeout(0.5)
            pending = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                pending += chunk
                for line in pending.split(b"\r\n")[:-1]:
                    if line.startswith(b"* BYE"):
                        self.byes.append(line)
                        return
                pending = pending.rsplit(b"\r\n", 1)[-1]
        finally:
            with contextlib.suppress(Exception):
                conn.shutdown()


def qresync_select(conn: imaplib.IMAP4, known: tuple[int, int] | None) -> tuple[int, int]:
    """SELECT INBOX, with ``(QRESYNC (uidvalidity modseq))`` when ``known``
    (RFC 7162 section 3.2.5); the (UIDVALIDITY, HIGHESTMODSEQ) it reports."""
    args = ["INBOX"] + ([f"(QRESYNC ({known[0]} {known[1]}))"] if known else [])
    typ, data = conn._simple_command("SELECT", *args)
    assert typ == "OK", data
    conn.state = "SELECTED"
    uidvalidity = conn.untagged_responses.pop("UIDVALIDITY")[-1]
    modseq = conn.untagged_responses.pop("HIGHESTMODSEQ")[-1]
    return int(uidvalidity), int(modseq)
