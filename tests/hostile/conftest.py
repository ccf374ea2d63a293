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
import json
import os
import poplib
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.imap_bench import stop_process
from conf.settings import AuthSettings
from storage.sql.directory import password_hasher
from tests.conftest import loopback_dns
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "example.org"
ALICE = f"alice@{DOMAIN}"
ALICE_PW = "alice-Secret-9"
# The account a password guesser aims at, and the one the fresh-login probe
# uses (POP3 locks a maildrop: ALICE's is held by the NOOP probe).
VICTIM = f"victim@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
BOB_PW = "bob-Secret-7"
ATTACKER = "127.0.0.1"
PROBE_ADDR = "127.0.0.9"
# Issue #18: another client's command is answered within one second.
MAX_PROBE_DELAY = 1.0
START_TIMEOUT = 60.0



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
        "server": {
            "hostname": "mail.test", "data_dir": str(data_dir), "log_level": "WARNING",
            # The attacker and the probe are both on loopback, which is exempt
            # from the new-connection rate by default: here it is held to it.
            "connect_rate_exempt": [],
        },
        # Plaintext logins on loopback keep the probe simple; TLS is not what is tested here.
        "auth": {"allow_plaintext": True},
        "smtp": {
            "mx_listen": [f"127.0.0.1:{ports['mx']}"],
            "submission_listen": [f"127.0.0.1:{ports['submission']}"],
            "submissions_listen": [f"127.0.0.1:{ports['submissions']}"],
            "spf": False,
            "dkim_verify": False,
            "dmarc": False,
        },
        "imap": {
            "listen": [f"127.0.0.1:{ports['imap']}"],
            "tls_listen": [f"127.0.0.1:{ports['imaps']}"],
        },
        "pop3": {
            "listen": [f"127.0.0.1:{ports['pop3']}"],
            "tls_listen": [f"127.0.0.1:{ports['pop3s']}"],
        },
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


def _prepare_accounts(config: Path, accounts: Sequence[tuple[str, str]]) -> None:
    """Domain and accounts through the admin CLI, as a sysadmin makes them
    (the default argon2 cost: password checks cost what they cost in production)."""
    base, conf = [sys.executable, "-m", "mailctl"], ["-c", str(config)]
    subprocess.run(
        [*base, "domain", "add", DOMAIN, *conf], check=True, cwd=REPO, capture_output=True
    )
    for address, password in accounts:
        subprocess.run(
            [*base, "account", "add", address, "--password-stdin", *conf],
            input=password.encode(), check=True, cwd=REPO, capture_output=True,
        )


@contextlib.contextmanager
def running_site(
    tmp_path: Path, *, accounts: Sequence[tuple[str, str]] = ((ALICE, ALICE_PW),), **extra: dict
) -> Iterator[Site]:
    """``mailctl serve`` with ``accounts`` made and ``extra`` config sections."""
    data_dir = tmp_path / "data"
    names = ("mx", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "http")
    ports = {name: free_port() for name in names}
    config = tmp_path / "shardmail.toml"
    _write_config(config, data_dir, ports, extra)
    _prepare_accounts(config, accounts)
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


@pytest.fixture
def site_with_victim(tmp_path: Path) -> Iterator[Site]:
    """The site with VICTIM (whose password an attacker guesses) and BOB (who
    logs in afresh while it does) besides ALICE. IMAP takes new connections
    from any address at any rate: the guesses must reach the login gate,
    which has to hold on its own against guessers on many addresses (the
    per-address connect rate is tested in test_connection_floods)."""
    accounts = ((ALICE, ALICE_PW), (VICTIM, "victim-Secret-4"), (BOB, BOB_PW))
    unthrottled = {"connect_rate_per_ip": 0}
    with running_site(tmp_path, accounts=accounts, imap=unthrottled) as running:
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


def _timed(answer: Callable[[], object]) -> float:
    """Seconds one answer took."""
    start = time.monotonic()
    answer()
    return time.monotonic() - start


# A probe's question: given its client, asks once. It returns None when the
# whole call is one answer (timed by the caller), or the seconds each of its
# answers took, by name, when it timed them itself.
Ask = Callable[[object], "dict[str, float] | None"]
Loops = dict[str, tuple[Callable[[], object], Ask]]


def _noop_loops(ports: dict[str, int]) -> Loops:
    """One logged-in session per protocol, asked NOOP (HTTP: /healthz) again and again."""

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

    return {"smtp": (smtp, smtp_ask), "imap": (imap, imap_ask),
            "pop3": (pop3, pop3_ask), "http": (http_, http_ask)}


def _ok(answer: bool, what: str) -> None:
    assert answer, f"{what} was not answered OK"


def _smtp_login(ports: dict[str, int]) -> float:
    """Greeting, EHLO, AUTH and NOOP on a new submission connection: the slowest."""
    client = _SMTP(timeout=30)
    took = [
        _timed(lambda: client.connect("127.0.0.1", ports["submission"])),
        _timed(lambda: client.ehlo("probe.test")),
        _timed(lambda: client.login(BOB, BOB_PW)),
        _timed(lambda: _ok(client.noop()[0] == 250, "SMTP NOOP")),
    ]
    client.quit()
    return max(took)


def _imap_login(ports: dict[str, int]) -> float:
    connected: list[_IMAP] = []
    took = [_timed(lambda: connected.append(_IMAP("127.0.0.1", ports["imap"])))]
    client = connected[0]
    took.append(_timed(lambda: client.login(BOB, BOB_PW)))
    took.append(_timed(lambda: _ok(client.noop()[0] == "OK", "IMAP NOOP")))
    client.logout()
    return max(took)


def _pop3_login(ports: dict[str, int]) -> float:
    connected: list[_POP3] = []
    took = [_timed(lambda: connected.append(_POP3("127.0.0.1", ports["pop3"], timeout=30)))]
    client = connected[0]
    took.append(_timed(lambda: (client.user(BOB), client.pass_(BOB_PW))))
    took.append(_timed(lambda: _ok(client.noop().startswith(b"+OK"), "POP3 NOOP")))
    client.quit()
    return max(took)


def _http_login(ports: dict[str, int]) -> float:
    """POST /v1/login, then GET /v1/me with the token: the slower."""
    client = _HTTP("127.0.0.1", ports["http"], timeout=30)
    token: list[str] = []

    def login() -> None:
        credentials = json.dumps({"address": BOB, "password": BOB_PW})
        client.request("POST", "/v1/login", body=credentials,
                       headers={"Content-Type": "application/json"})
        token.append(json.loads(client.getresponse().read())["token"])

    def me() -> None:
        client.request("GET", "/v1/me", headers={"Authorization": f"Bearer {token[0]}"})
        _ok(json.loads(client.getresponse().read())["address"] == BOB, "GET /v1/me")

    took = max(_timed(login), _timed(me))
    client.close()
    return took


def _login_loops(ports: dict[str, int]) -> Loops:
    """One client logging in correctly to BOB on each protocol in turn, on a new
    connection each time, and running NOOP (HTTP: GET /v1/me). In turn, not at
    once: a client with another check in flight is suspect to the login gate."""
    logins = {"smtp": _smtp_login, "imap": _imap_login, "pop3": _pop3_login,
              "http": _http_login}
    # A login costs one argon2 check, whose own time follows the machine's
    # load (2 shared cores here): each login is measured beyond a check with
    # the site's parameters, run by the probe just before it.
    hasher = password_hasher(AuthSettings())
    reference = hasher.hash(BOB_PW)

    def one_check() -> None:
        hasher.verify(reference, BOB_PW)

    def ask(_: object) -> dict[str, float]:
        beyond = {}
        for name, login in logins.items():
            check = _timed(one_check)
            beyond[f"{name} login"] = max(0.0, login(ports) - check)
        return beyond

    return {"logins": (lambda: None, ask)}


@dataclass
class Probe:
    """Another client on every protocol, asking a trivial question in a loop.

    ``worst`` holds, per answer, the longest time it took while the probe ran
    (an answer still awaited when the probe stops counts as well), ``counts``
    how many rounds each loop finished; ``errors`` any failure (a refused or
    dropped probe is a failure too: the attack must not reach other clients).

    With ``fresh_logins`` each round is new connections and correct logins: a
    login checks a password, which takes its time on an idle server too, so
    a login is measured beyond one argon2 check timed beside it, and the
    allowance is one second over ``quiet``, its slowest before the attack."""

    site: Site
    fresh_logins: bool = False
    worst: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    quiet: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _asking_since: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self, name: str, connect: Callable[[], object], ask: Ask) -> None:
        try:
            client = connect()
        except Exception as exc:  # the probe's own setup failing is a test failure
            self.errors.append(f"{name} connect: {exc!r}")
            return
        self.counts[name] = 0
        while not self._stop.is_set():
            start = self._asking_since[name] = time.monotonic()
            try:
                took = ask(client) or {name: time.monotonic() - start}
            except Exception as exc:
                self.errors.append(f"{name}: {exc!r}")
                return
            finally:
                del self._asking_since[name]
            for answer, seconds in took.items():
                self.worst[answer] = max(self.worst.get(answer, 0.0), seconds)
            self.counts[name] += 1
            self._stop.wait(0.05)

    def start(self) -> Probe:
        loops = (_login_loops if self.fresh_logins else _noop_loops)(self.site.ports)
        for name, (connect, ask) in loops.items():
            thread = threading.Thread(target=self._loop, args=(name, connect, ask), daemon=True)
            thread.start()
            self._threads.append(thread)
        # Logins and first answers are not part of the measurement.
        self._next_rounds(len(loops))
        if self.fresh_logins:
            # The slowest of a few rounds: a check's own time varies with what
            # else the machine runs, and the allowance is over its worst.
            self._next_rounds(len(loops), rounds=3)
            self.quiet = dict(self.worst)
            self.worst.clear()
        return self

    def _next_rounds(self, loops: int, rounds: int = 1) -> None:
        """Clears the measurements, then waits until every loop finished
        ``rounds`` rounds from now (``worst`` then holds theirs)."""
        self.worst.clear()
        self.counts = dict.fromkeys(self.counts, 0)
        deadline = time.monotonic() + 60
        while len(self.counts) + len(self.errors) < loops or min(
            self.counts.values(), default=0
        ) < rounds:
            if self.errors or time.monotonic() > deadline:
                raise AssertionError(f"probe did not start: {self.errors}")
            time.sleep(0.05)
        self.counts = dict.fromkeys(self.counts, 0)

    def stop(self) -> None:
        """Lets each loop finish its round (up to 30 s), so that a round still
        waiting for its answers is measured too. An attack that ended
        before any loop finished a round is followed by one more round of
        each, so that every protocol answered after it (or is measured
        as still waiting)."""
        deadline = time.monotonic() + 30
        while (
            min(self.counts.values(), default=1) < 1
            and not self.errors
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        now = time.monotonic()
        for name, since in list(self._asking_since.items()):  # no answer even now
            self.worst[name] = max(self.worst.get(name, 0.0), now - since)

    def assert_responsive(self) -> None:
        assert not self.errors, self.errors
        assert all(n > 0 for n in self.counts.values()), f"no answer while probing: {self.counts}"
        slow = {
            name: round(t, 3)
            for name, t in self.worst.items()
            if t > MAX_PROBE_DELAY + self.quiet.get(name, 0.0)
        }
        quiet = {name: round(t, 3) for name, t in self.quiet.items()}
        assert not slow, f"another client waited over {MAX_PROBE_DELAY}s: {slow} (quiet {quiet})"


@contextlib.contextmanager
def probing(site: Site, fresh_logins: bool = False) -> Iterator[Probe]:
    """Run the probe around an attack and assert, when the attack is over, that
    no answer to it took more than a second (see :class:`Probe` for logins)."""
    probe = Probe(site, fresh_logins).start()
    try:
        yield probe
    finally:
        probe.stop()
    probe.assert_responsive()


def assert_memory_returned(site: Site, baseline_kib: int) -> None:
    """Issue #18: memory comes back to within 10% of its starting point."""
    after = site.settled_rss_kib()
    assert after <= baseline_kib * 1.10, f"RSS {after} KiB after the attack, {baseline_kib} before"
