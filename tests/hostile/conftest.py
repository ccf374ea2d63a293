"""The hostile-input regression suite's site: all three daemons in ONE process
(``mailctl serve``, the embedded default), as an attacker finds them.

Each test runs an attack from 127.0.0.1 while a :class:`Probe` on 127.0.0.9
(another client, so per-IP limits and throttles aimed at the attacker do not
touch it) keeps asking every protocol for a trivial answer: SMTP ``NOOP``,
IMAP ``NOOP`` in a logged-in session, POP3 ``NOOP`` in a transaction, HTTP
``GET /healthz``. The rule from issue #18: no input from one client delays
another's command by more than one second, and the server's memory comes
back to within 10% of where it started once the attack stops.
"""

from __future__ import annotations

import contextlib
import http.client
import imaplib
import os
import poplib
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.imap_bench import stop_process
from tests.conftest import loopback_dns

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "example.org"
ALICE = f"alice@{DOMAIN}"
ALICE_PW = "alice-Secret-9"
ATTACKER = "127.0.0.1"
PROBE_ADDR = "127.0.0.9"
# Issue #18: another client's command is answered within one second.
MAX_PROBE_DELAY = 1.0
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


@dataclass
class Site:
    """A running ``mailctl serve``: its ports, process and data dir."""

    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    data_dir: Path
    log_path: Path

    def rss_kib(self) -> int:
        """Resident memory of the daemon process, from /proc (KiB)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def settled_rss_kib(self, seconds: float = 3.0) -> int:
        """RSS once the process has had ``seconds`` to finish and free what an
        attack left (the lowest of a few samples: collection is not instant)."""
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append(self.rss_kib())
            time.sleep(0.25)
        return min(samples)


def _write_config(path: Path, data_dir: Path, ports: dict[str, int], extra: dict) -> None:
    sections: dict[str, dict[str, object]] = {
        "server": {"hostname": "mail.test", "data_dir": str(data_dir), "log_level": "WARNING"},
        # Plaintext logins on loopback keep the probe simple; TLS is not what is tested here.
        "auth": {"allow_plaintext": True},
        "smtp": {
            "mx_listen": [f"127.0.0.1:{ports['mx']}"],
            "submission_listen": [f"127.0.0.1:{ports['submission']}"],
            "submissions_listen": ["127.0.0.1:0"],
            "spf": False,
            "dkim_verify": False,
            "dmarc": False,
        },
        "imap": {"listen": [f"127.0.0.1:{ports['imap']}"], "tls_listen": ["127.0.0.1:0"]},
        "pop3": {"listen": [f"127.0.0.1:{ports['pop3']}"], "tls_listen": ["127.0.0.1:0"]},
        "http": {"listen": [f"127.0.0.1:{ports['http']}"]},
        "queue": {"workers": 0},
        "dns": loopback_dns(),
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


def _prepare_account(config: Path) -> None:
    """Domain and account through the admin CLI, as a sysadmin makes them
    (the default argon2 cost: password checks cost what they cost in production)."""
    base, conf = [sys.executable, "-m", "mailctl"], ["-c", str(config)]
    subprocess.run(
        [*base, "domain", "add", DOMAIN, *conf], check=True, cwd=REPO, capture_output=True
    )
    subprocess.run(
        [*base, "account", "add", ALICE, "--password-stdin", *conf],
        input=ALICE_PW.encode(), check=True, cwd=REPO, capture_output=True,
    )


@contextlib.contextmanager
def running_site(tmp_path: Path, **extra: dict) -> Iterator[Site]:
    data_dir = tmp_path / "data"
    ports = {name: free_port() for name in ("mx", "submission", "imap", "pop3", "http")}
    config = tmp_path / "shardmail.toml"
    _write_config(config, data_dir, ports, extra)
    _prepare_account(config)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailctl", "serve", "-c", str(config)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy(),
        )
    site = Site(proc, ports, data_dir, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "shardmail ready" not in site.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mailctl serve did not start:\n{site.log()}")
            time.sleep(0.05)
        yield site
    finally:
        stop_process(proc)  # the benchmarks' stop: SIGTERM, SIGKILL after 15 s
    assert "Traceback" not in site.log(), site.log()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_site(tmp_path) as running:
        yield running


def _from_probe_addr(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(PROBE_ADDR, 0))


class _SMTP(smtplib.SMTP):
    def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
        return _from_probe_addr(port)


class _IMAP(imaplib.IMAP4):
    def _create_socket(self, timeout):  # type: ignore[no-untyped-def]
        return _from_probe_addr(self.port)


class _POP3(poplib.POP3):
    def _create_socket(self, timeout):  # type: ignore[no-untyped-def]
        return _from_probe_addr(self.port)


class _HTTP(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = _from_probe_addr(self.port)


@dataclass
class Probe:
    """Another client on every protocol, asking a trivial question in a loop.

    ``worst`` holds, per protocol, the longest time one answer took while the
    probe ran; ``errors`` any failure (a refused or dropped probe is a failure
    too: the attack must not reach other clients)."""

    site: Site
    worst: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _loop(
        self, name: str, connect: Callable[[], object], ask: Callable[[object], None]
    ) -> None:
        try:
            client = connect()
        except Exception as exc:  # the probe's own setup failing is a test failure
            self.errors.append(f"{name} connect: {exc!r}")
            return
        self.worst[name] = 0.0
        self.counts[name] = 0
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                ask(client)
            except Exception as exc:
                self.errors.append(f"{name}: {exc!r}")
                return
            took = time.monotonic() - start
            self.worst[name] = max(self.worst[name], took)
            self.counts[name] += 1
            self._stop.wait(0.05)

    def start(self) -> Probe:
        ports = self.site.ports

        def smtp() -> object:
            client = _SMTP("127.0.0.1", ports["mx"], timeout=30)
            client.ehlo("probe.test")
            return client

        def imap() -> object:
            client = _IMAP("127.0.0.1", ports["imap"])
            client.login(ALICE, ALICE_PW)
            client.select("INBOX")
            return client

        def pop3() -> object:
            client = _POP3("127.0.0.1", ports["pop3"], timeout=30)
            client.user(ALICE)
            client.pass_(ALICE_PW)
            return client

        def http_() -> object:
            return _HTTP("127.0.0.1", ports["http"], timeout=30)

        def http_ask(client: object) -> None:
            assert isinstance(client, _HTTP)
            client.request("GET", "/healthz")
            response = client.getresponse()
            response.read()
            assert response.status == 200, response.status

        def smtp_ask(c: object) -> None:
            assert c.noop()[0] == 250  # type: ignore[attr-defined]

        def imap_ask(c: object) -> None:
            assert c.noop()[0] == "OK"  # type: ignore[attr-defined]

        def pop3_ask(c: object) -> None:
            assert c.noop().startswith(b"+OK")  # type: ignore[attr-defined]

        loops = {"smtp": (smtp, smtp_ask), "imap": (imap, imap_ask),
                 "pop3": (pop3, pop3_ask), "http": (http_, http_ask)}
        for name, (connect, ask) in loops.items():
            thread = threading.Thread(target=self._loop, args=(name, connect, ask), daemon=True)
            thread.start()
            self._threads.append(thread)
        deadline = time.monotonic() + 30
        while len(self.counts) + len(self.errors) < len(loops) or min(
            self.counts.values(), default=0
        ) < 1:
            if self.errors or time.monotonic() > deadline:
                raise AssertionError(f"probe did not start: {self.errors}")
            time.sleep(0.05)
        # Logins and first answers are not part of the measurement.
        self.worst = dict.fromkeys(self.worst, 0.0)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def assert_responsive(self) -> None:
        assert not self.errors, self.errors
        assert all(n > 0 for n in self.counts.values()), self.counts
        slow = {name: round(t, 3) for name, t in self.worst.items() if t > MAX_PROBE_DELAY}
        assert not slow, f"another client waited more than {MAX_PROBE_DELAY}s: {slow}"


@contextlib.contextmanager
def probing(site: Site) -> Iterator[Probe]:
    """Run the probe around an attack and assert, when the attack is over, that
    no answer to it took more than a second."""
    probe = Probe(site).start()
    try:
        yield probe
    finally:
        probe.stop()
    probe.assert_responsive()


def assert_memory_returned(site: Site, baseline_kib: int) -> None:
    """Issue #18: memory comes back to within 10% of its starting point."""
    after = site.settled_rss_kib()
    assert after <= baseline_kib * 1.10, f"RSS {after} KiB after the attack, {baseline_kib} before"
