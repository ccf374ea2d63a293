"""A throwaway rspamd for tests: Debian's rspamd 3.4 in the foreground with
its own configuration directory, a normal worker (``/checkv2``) and a
controller (``/learnspam``, ``/learnham``, ``/stat``, with a password) on
127.0.0.1 free ports, its Bayes statistics in the suite's Redis.

Reusable by any suite::

    from tests.rspamdserver import RspamdServer
    server = RspamdServer.start(redis_port)   # RspamdServerError with rspamd's log
    server.url, server.controller_url, server.password
    server.stop()                             # or pause()/resume(): an outage

or, in a test module, the ``rspamd`` fixture (``from tests.rspamdserver
import rspamd``): one server for the session, on the session's Redis.

Nothing leaves loopback: the only nameserver rspamd knows is a closed
port on 127.0.0.1, and every module that looks things up on the network
(RBL, SURBL, fuzzy, ASN, SPF, DKIM, DMARC, greylisting, reputation...) is
off. Spam is deterministic: a Lua rule scores :data:`SPAM_TOKEN` in the
message at :data:`SPAM_TOKEN_SCORE` (past "add header", below "reject"),
and GTUBE (:data:`GTUBE`) is rejected by rspamd's own rule.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ports import free_port as _free_port

START_TIMEOUT = 90.0
PASSWORD = "shardmail-test-controller"
SPAM_TOKEN = "SHARDMAIL-TEST-SPAM-TOKEN"
SPAM_TOKEN_SYMBOL = "SHARDMAIL_TEST_SPAM"
SPAM_TOKEN_SCORE = 9.0
ADD_HEADER_SCORE = 6.0
REJECT_SCORE = 15.0
REDIS_DB = 5  # rspamd's keys, apart from the other tests' database 0
# The GTUBE test string, rspamd rejects any message carrying it.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

# Modules that talk to the network (or keep state across messages that
# would make a verdict depend on the test order): all off.
DISABLED_MODULES = (
    "arc", "asn", "bimi", "chartable", "clickhouse", "dcc", "dkim", "dkim_signing",
    "dmarc", "elastic", "emails", "external_services", "fuzzy_check", "greylist",
    "history_redis", "maillist", "metadata_exporter", "metric_exporter", "mid",
    "multimap", "mx_check", "neural", "p0f", "phishing", "ratelimit", "rbl",
    "replies", "reputation", "rspamd_update", "spamassassin", "spamtrap", "spf",
    "surbl", "url_redirector", "whitelist", "hfilter", "once_received",
)

LUA_RULES = f"""
-- shardmail tests: a deterministic spam rule on a token in the message.
rspamd_config.{SPAM_TOKEN_SYMBOL} = {{
  callback = function(task)
    local content = tostring(task:get_content())
    return string.find(content, '{SPAM_TOKEN}', 1, true) ~= nil
  end,
  score = {SPAM_TOKEN_SCORE},
  description = 'shardmail test spam token',
  group = 'shardmail',
}}
"""


class RspamdServerError(RuntimeError):
    pass


def find_rspamd() -> str:
    path = shutil.which("rspamd") or next(
        (p for p in ("/usr/bin/rspamd", "/usr/sbin/rspamd") if Path(p).exists()), None
    )
    if path is None:
        raise RspamdServerError("rspamd not found (tests/run.sh installs it)")
    return path


class RspamdServer:
    """A running rspamd; ``stop()`` kills it and removes its files."""

    def __init__(self, root: Path, redis_port: int) -> None:
        self.root = root
        self.redis_port = redis_port
        self.port = _free_port()
        self.controller_port = _free_port()
        self.dns_port = _free_port()  # nobody listens
        self.password = PASSWORD
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    @property
    def log_path(self) -> Path:
        return self.root / "rspamd.log"

    @classmethod
    def start(cls, redis_port: int) -> RspamdServer:
        find_rspamd()
        root = Path(tempfile.mkdtemp(prefix="shardmail-rspamd-"))
        last_error = ""
        for _attempt in range(3):
            server = cls(root, redis_port)
            try:
                server._spawn()
                return server
            except RspamdServerError as exc:
                last_error = str(exc)
        shutil.rmtree(root, ignore_errors=True)
        raise RspamdServerError(f"rspamd did not start: {last_error}")

    def _write_config(self) -> Path:
        local = self.root / "local"
        for sub in ("local.d", "override.d", "db", "run"):
            (local / sub if sub.endswith(".d") else self.root / sub).mkdir(
                parents=True, exist_ok=True
            )
        d = local / "local.d"
        for module in DISABLED_MODULES:
            (local / "override.d" / f"{module}.conf").write_text("enabled = false;\n")
        (d / "redis.conf").write_text(
            f'servers = "127.0.0.1:{self.redis_port}";\ndb = "{REDIS_DB}";\n'
        )
        (d / "classifier-bayes.conf").write_text(
            'backend = "redis";\nautolearn = false;\nmin_learns = 1;\n'
        )
        (d / "actions.conf").write_text(
            f"reject = {REJECT_SCORE};\nadd_header = {ADD_HEADER_SCORE};\ngreylist = null;\n"
        )
        (d / "options.inc").write_text(
            "dns {\n"
            f'  nameserver = ["127.0.0.1:{self.dns_port}"];\n'
            "  timeout = 0.2s;\n  retransmits = 0;\n}\n"
            'local_addrs = "127.0.0.0/8, ::1";\n'
        )
        (local / "rspamd.local.lua").write_text(LUA_RULES)
        config = self.root / "rspamd.conf"
        config.write_text(
            f"""
.include "$CONFDIR/common.conf"
options {{
    pidfile = "{self.root / 'run' / 'rspamd.pid'}";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "{self.log_path}";
    level = "info";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{self.port}";
    count = 1;
    task_timeout = 20s;
}}
worker "controller" {{
    bind_socket = "127.0.0.1:{self.controller_port}";
    count = 1;
    password = "{self.password}";
    enable_password = "{self.password}";
    secure_ip = [];
    static_dir = "${{WWWDIR}}";
}}
"""
        )
        return config

    def _command(self, config: Path) -> list[str]:
        local = self.root / "local"
        cmd = [
            find_rspamd(), "-f", "-c", str(config),
            "--var", f"LOCAL_CONFDIR={local}",
            "--var", f"DBDIR={self.root / 'db'}",
            "--var", f"RUNDIR={self.root / 'run'}",
            "--var", f"LOGDIR={self.root}",
        ]
        if os.geteuid() == 0:
            cmd.append("-i")  # workers as root: the test's own temp dir only
        return cmd

    def _spawn(self) -> None:
        """Starts rspamd and waits until both workers answer ``/ping``."""
        config = self._write_config()
        with open(self.root / "rspamd.out", "ab") as out:
            self.proc = subprocess.Popen(
                self._command(config),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )
        if not self._wait_ready():
            self._kill()
            raise RspamdServerError(self.log_tail() or "no output")

    def log_tail(self) -> str:
        text = ""
        for name in ("rspamd.out", "rspamd.log"):
            with contextlib.suppress(OSError):
                text += (self.root / name).read_text(errors="replace")[-4000:]
        return text

    @staticmethod
    def _ping(url: str) -> bool:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as reply:
                return reply.status == 200 and reply.read().strip() == b"pong"
        return False

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if self._ping(self.url) and self._ping(self.controller_url):
                return True
            time.sleep(0.2)
        return False

    def stat(self) -> dict[str, object]:
        """The controller's ``/stat`` (learned counts among it)."""
        import json

        request = urllib.request.Request(
            f"{self.controller_url}/stat", headers={"Password": self.password}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return dict(json.loads(reply.read()))

    def learns(self) -> dict[str, int]:
        """How many messages rspamd's Bayes learned as ``spam`` and ``ham``:
        its counters in Redis (hash ``RS``, ``learns_spam``/``learns_ham``),
        written by the learn itself (the controller's /stat reads them back
        only now and then)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.redis_port, db=REDIS_DB)
        try:
            counts = client.hgetall("RS")
        finally:
            client.close()
        return {
            kind: int(counts.get(f"learns_{kind}".encode(), 0)) for kind in ("spam", "ham")
        }

    def learns_reach(self, expected: dict[str, int], within: float = 10.0) -> dict[str, int]:
        """:meth:`learns` once it equals ``expected``, or as it stands after
        ``within`` seconds. rspamd answers a learn before all of its Redis
        writes have landed (an unlearn of the other class comes after), so
        the counters may lag the learn's reply by a moment."""
        deadline = time.monotonic() + within
        while True:
            seen = self.learns()
            if seen == expected or time.monotonic() > deadline:
                return seen
            time.sleep(0.05)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the main process and its workers
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """Stops rspamd; its ports refuse connections until :meth:`resume`."""
        self._kill()

    def resume(self) -> None:
        self._spawn()

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.root, ignore_errors=True)


_SHARED: list[RspamdServer] = []


def _stop_shared() -> None:
    while _SHARED:
        _SHARED.pop().stop()


def shared_server(redis_port: int) -> RspamdServer:
    """One rspamd for the whole test session (started on first use, stopped
    when the process exits), running again if a test paused it. Raises
    RspamdServerError with rspamd's log: the test fails."""
    if _SHARED and _SHARED[0].redis_port != redis_port:
        _stop_shared()
    if not _SHARED:
        _SHARED.append(RspamdServer.start(redis_port))
        atexit.register(_stop_shared)
    server = _SHARED[0]
    if not server.running:
        server.resume()
    return server


@pytest.fixture
def rspamd(redis_server) -> RspamdServer:  # tests/conftest.py's session Redis
    """The session's rspamd (:func:`shared_server`) on the session's Redis,
    up and answering. The Redis must be running too (a test may pause it)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.resume()
    return shared_server(redis_server.port)
