"""`mailctl serve`: the whole daemon set in one process, as the README starts it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import pytest

from tests.ports import free_port

LISTENERS = {
    "smtp.mx_listen": b"220 ",
    "smtp.submission_listen": b"220 ",
    "imap.listen": b"* OK",
    "pop3.listen": b"+OK",
}
TLS_LISTENERS = {
    "smtp.submissions_listen": b"220 ",
    "imap.tls_listen": b"* OK",
    "pop3.tls_listen": b"+OK",
}



def stop(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit status (killed, and the test failed, after 30 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        log = getattr(proc, "serve_log", None)
        raise AssertionError(
            "not stopped 30 s after SIGTERM; it logged:\n" + (log.text() if log else "")
        ) from None


def greeting(port: int, tls: bool) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the generated self-signed certificate
        sock = ctx.wrap_socket(sock)
    with sock:
        return sock.recv(512)


def start_serving(data_dir: Path, ports: dict[str, int], *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "mailctl", "serve", "-o", f"server.data_dir={data_dir}", *extra]
    for key, port in ports.items():
        args += ["-o", f"{key}=['127.0.0.1:{port}']"]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


class ServeLog:
    """What a ``mailctl serve`` process writes to stderr, read by a thread
    from the start to the end: the test can wait for a line with a deadline
    (a blocking ``readline()`` never returns if the process hangs silently),
    and the pipe never fills up (a full pipe would block the server's
    logging, and so the server)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> list[str]:
        """The first ``count`` lines holding ``text``; fails the test, with
        everything logged, if the process ends or ``timeout`` passes first."""
        def found() -> list[str]:
            return [line for line in self.lines if text in line]

        with self._changed:
            self._changed.wait_for(lambda: len(found()) >= count or self.ended, timeout)
            matches = found()
            assert len(matches) >= count, f"{len(matches)} of {count} {text!r} lines:\n" + "".join(
                self.lines
            )
        return matches[:count]

    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)


def serve_log(proc: subprocess.Popen) -> ServeLog:
    """The one :class:`ServeLog` reading ``proc``'s stderr."""
    log = getattr(proc, "serve_log", None)
    if log is None:
        log = ServeLog(proc.stderr)
        proc.serve_log = log  # type: ignore[attr-defined]
    return log


def wait_ready(proc: subprocess.Popen, count: int = 1) -> str:
    """The (last of ``count``) ready line(s); the test fails with what was
    logged if none comes within a minute."""
    return serve_log(proc).wait_for("shardmail ready", count)[-1]


def test_serve_starts_every_daemon_and_stops_on_sigterm(tmp_path: Path) -> None:
    keys = [*LISTENERS, *TLS_LISTENERS, "http.listen", "server.metrics_listen"]
    ports = {key: free_port() for key in keys}
    proc = start_serving(tmp_path / "d", ports)
    try:
        assert "shardmail ready: mtad imapd httpapi" in wait_ready(proc)

        for key, expected in LISTENERS.items():
            assert greeting(ports[key], tls=False).startswith(expected), key
        for key, expected in TLS_LISTENERS.items():
            assert greeting(ports[key], tls=True).startswith(expected), key
        url = f"http://127.0.0.1:{ports['http.listen']}/healthz"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
        # Metrics are on their own loopback listener, not on the public API port.
        url = f"http://127.0.0.1:{ports['server.metrics_listen']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert b'shardmail_connections_total{protocol="imap"}' in resp.read()
        with pytest.raises(urllib.error.HTTPError) as not_there:
            urllib.request.urlopen(f"http://127.0.0.1:{ports['http.listen']}/metrics", timeout=10)
        assert not_there.value.code == 404
        # First start generated the self-signed certificate.
        assert (tmp_path / "d" / "tls" / "cert.pem").exists()
    finally:
        code = stop(proc)
    assert code == 0


def children_of(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return found


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_serve_with_two_workers_shares_ports_restarts_and_stops(tmp_path: Path) -> None:
    """server.processes = 2: a supervisor and two workers on the same ports;
    a killed worker is replaced; SIGTERM stops every process."""
    ports = {key: free_port() for key in [*LISTENERS, *TLS_LISTENERS, "http.listen"]}
    args = [
        sys.executable, "-m", "mailctl", "serve",
        "-o", f"server.data_dir={tmp_path / 'd'}", "-o", "server.processes=2",
    ]
    for key, port in ports.items():
        args += ["-o", f"{key}=['127.0.0.1:{port}']"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    workers: set[int] = set()
    try:
        assert "shardmail ready: mtad imapd httpapi" in wait_ready(proc, count=2)
        workers = children_of(proc.pid)
        assert len(workers) == 2
        # Each connection lands on one of the workers; all of them answer.
        for _ in range(6):
            for key, expected in LISTENERS.items():
                assert greeting(ports[key], tls=False).startswith(expected), key
        for key, expected in TLS_LISTENERS.items():
            assert greeting(ports[key], tls=True).startswith(expected), key
        # The supervisor made the shared state once, before forking.
        assert sorted(p.name for p in (tmp_path / "d" / "tls").iterdir()) == [
            "cert.pem", "key.pem"
        ]
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(children_of(proc.pid) - {victim}) == 2), "not replaced"
        workers = children_of(proc.pid)
        url = f"http://127.0.0.1:{ports['http.listen']}/healthz"
        for _ in range(4):
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
    finally:
        code = stop(proc)
    assert code == 0
    assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 5)


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL (no chance to tell its workers) leaves
    no worker serving on its own: each is sent SIGTERM by the kernel
    (PR_SET_PDEATHSIG) and stops, freeing the ports."""
    ports = {key: free_port() for key in [*LISTENERS, *TLS_LISTENERS, "http.listen"]}
    args = [
        sys.executable, "-m", "mailctl", "serve",
        "-o", f"server.data_dir={tmp_path / 'd'}", "-o", "server.processes=2",
    ]  # fmt: skip
    for key, port in ports.items():
        args += ["-o", f"{key}=['127.0.0.1:{port}']"]
    proc = subprocess.Popen(
        args, stderr=subprocess.PIPE, text=True, env=os.environ.copy(), start_new_session=True
    )
    workers: set[int] = set()
    try:
        wait_ready(proc, count=2)
        workers = children_of(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone = wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 60)
        assert gone, "a worker outlived its supervisor"
        with pytest.raises(OSError):
            greeting(ports["imap.listen"], tls=False)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_workers_need_fixed_ports(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailctl", "check-config", "-o", "server.processes=2",
         "-o", "imap.listen=['127.0.0.1:0']", "-o", f"server.data_dir={tmp_path}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "imap.listen" in result.stderr and "server.processes" in result.stderr


def test_a_second_site_on_a_port_in_use_fails_naming_the_listener(tmp_path: Path) -> None:
    """Without server.share_ports, a second `mailctl serve` (another data dir)
    on a busy port must not silently take half of its connections."""
    ports = {key: free_port() for key in [*LISTENERS, *TLS_LISTENERS, "http.listen"]}
    first = start_serving(tmp_path / "one", ports)
    try:
        wait_ready(first)
        for workers in ("1", "2"):  # alone, and as a supervisor binding for its workers
            other = {key: free_port() for key in ports} | {"imap.listen": ports["imap.listen"]}
            second = start_serving(tmp_path / f"two{workers}", other, "-o",
                                   f"server.processes={workers}")
            try:
                _, err = second.communicate(timeout=60)
            finally:
                if second.poll() is None:
                    second.kill()
            assert second.returncode == 1, err
            assert f"imap.listen: cannot listen on 127.0.0.1:{ports['imap.listen']}" in err, err
            assert "Address already in use" in err and "Traceback" not in err, err
        # The first site still answers on that port, every time.
        for _ in range(6):
            assert greeting(ports["imap.listen"], tls=False).startswith(b"* OK")
    finally:
        assert stop(first) == 0
