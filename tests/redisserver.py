"""A throwaway Redis server for tests: ``redis-server`` on 127.0.0.1 with a
free port, no persistence, its files in a temp dir (like tests/pgserver.py).

Reusable by any suite::

    from tests.redisserver import RedisServer
    server = RedisServer.start()   # raises RedisServerError if it cannot
    settings_url = server.url      # "redis://127.0.0.1:PORT/0"
    server.stop()                  # or pause()/resume() to simulate an outage

Never the default port 6379: a Redis the machine runs (Debian's package may
start one) is never touched. Each server is empty when it starts.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.ports import free_port as _free_port

START_TIMEOUT = 30.0
DEFAULT_PORT = 6379  # never used by the tests


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    path = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).exists()),
        None,
    )
    if path is None:
        raise RedisServerError("redis-server not found (tests/run.sh installs it)")
    return path


class RedisServer:
    """A running test server; ``stop()`` kills it and removes its files."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls) -> RedisServer:
        find_redis_server()
        root = Path(tempfile.mkdtemp(prefix="shardmail-redis-"))
        last_error = ""
        for _attempt in range(3):
            server = cls(root, _free_port())
            try:
                server._spawn()
                return server
            except RedisServerError as exc:
                last_error = str(exc)
        shutil.rmtree(root, ignore_errors=True)
        raise RedisServerError(f"redis-server did not start: {last_error}")

    def _spawn(self) -> None:
        """Starts redis-server on ``self.port`` and waits until it answers PING."""
        log_path = self.root / "redis.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    find_redis_server(),
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--dir", str(self.root),
                    "--save", "",  # no RDB snapshots
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--unixsocket", "",
                    "--logfile", "",
                    "--databases", "16",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )
        if not self._wait_ready():
            self._kill()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RedisServerError(tail or "no output")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            time.sleep(0.05)
        return False

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def flush(self) -> None:
        """Empties every database (each test starts from nothing)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(64).startswith(b"+OK"):
                raise RedisServerError("FLUSHALL failed")

    def pause(self) -> None:
        """Stops the server (its data is lost: no persistence); the port stays
        this server's for :meth:`resume`. Clients see connection refused."""
        self._kill()

    def resume(self) -> None:
        """Starts an empty server again on the same port."""
        self._spawn()

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.root, ignore_errors=True)
