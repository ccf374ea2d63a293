"""A throwaway clamd for tests: clamav-daemon in the foreground with its own
config, a Unix socket and a TCP socket on 127.0.0.1 (free port), and a tiny
signature database built at start (no signature can be downloaded here).

Reusable by any suite::

    from tests.clamdserver import ClamdServer
    server = ClamdServer.start()   # raises ClamdServerError (with clamd's log)
    server.socket_path             # the LocalSocket
    server.tcp_address             # "127.0.0.1:PORT"
    server.stop()                  # or pause()/resume() to simulate an outage

or, in a test module, the ``clamd`` fixture (``from tests.clamdserver import
clamd``): one server for the whole session, whichever modules use it.

The database (``test.hdb``, ``test.ndb``) holds two signatures of the EICAR
test file: an MD5 hash signature of the file as ``sigtool --md5`` prints it,
and a body signature of its bytes (``sigtool --hex-dump``) for any file type,
which also matches EICAR inside a MIME part or a zip member, since clamd
decodes mail (ScanMail) and unpacks archives (ScanArchive) before matching.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.ports import free_port as _free_port

START_TIMEOUT = 60.0
STREAM_MAX_LENGTH = 8 * 1024 * 1024
HASH_SIGNATURE = "Shardmail.Test.EICAR-HDB"
BODY_SIGNATURE = "Shardmail.Test.EICAR-NDB"
SIGNATURE_PREFIX = "Shardmail.Test.EICAR"

# The EICAR anti-virus test file (https://www.eicar.org), 68 octets.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


class ClamdServerError(RuntimeError):
    pass


def _find(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None
    )
    if path is None:
        raise ClamdServerError(f"{name} not found (tests/run.sh installs clamav-daemon, clamav)")
    return path



def build_database(directory: Path) -> None:
    """Writes the EICAR signatures into ``directory`` with sigtool."""
    directory.mkdir(parents=True, exist_ok=True)
    sample = directory.parent / "eicar.com"
    sample.write_bytes(EICAR)
    sigtool = _find("sigtool")
    md5 = subprocess.run(
        [sigtool, "--md5", str(sample)], capture_output=True, check=True, timeout=60
    ).stdout.decode()
    digest, size, _name = md5.strip().split(":", 2)
    (directory / "test.hdb").write_text(f"{digest}:{size}:{HASH_SIGNATURE}\n")
    hexdump = subprocess.run(
        [sigtool, "--hex-dump"], input=EICAR, capture_output=True, check=True, timeout=60
    ).stdout.decode()
    # Name:TargetType:Offset:HexSignature; target 0 = any file, offset * = anywhere.
    (directory / "test.ndb").write_text(f"{BODY_SIGNATURE}:0:*:{hexdump.strip()}\n")
    sample.unlink()


class ClamdServer:
    """A running clamd; ``stop()`` kills it and removes its files."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return str(self.root / "clamd.sock")

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "clamd.log"

    @classmethod
    def start(cls) -> ClamdServer:
        _find("clamd")
        root = Path(tempfile.mkdtemp(prefix="shardmail-clamd-"))
        root.chmod(0o755)  # clamd may drop to its own user to read the database
        try:
            build_database(root / "db")
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise ClamdServerError(f"cannot build the signature database: {exc}") from exc
        last_error = ""
        for _attempt in range(3):
            server = cls(root, _free_port())
            try:
                server._spawn()
                return server
            except ClamdServerError as exc:
                last_error = str(exc)
        shutil.rmtree(root, ignore_errors=True)
        raise ClamdServerError(f"clamd did not start: {last_error}")

    def _write_config(self) -> Path:
        config = self.root / "clamd.conf"
        config.write_text(
            "\n".join([
                "Foreground yes",
                f"DatabaseDirectory {self.root / 'db'}",
                f"LocalSocket {self.socket_path}",
                "LocalSocketMode 600",
                f"TCPSocket {self.port}",
                "TCPAddr 127.0.0.1",
                f"LogFile {self.log_path}",
                f"PidFile {self.root / 'clamd.pid'}",
                f"TemporaryDirectory {self.root}",
                "ScanArchive yes",
                "ScanMail yes",
                f"StreamMaxLength {STREAM_MAX_LENGTH}",
                "MaxThreads 4",
                "SelfCheck 0",
                "",
            ])
        )
        return config

    def _spawn(self) -> None:
        """Starts clamd and waits until it answers PING on both sockets."""
        config = self._write_config()
        Path(self.socket_path).unlink(missing_ok=True)
        with open(self.root / "clamd.out", "ab") as out:
            self.proc = subprocess.Popen(
                [_find("clamd"), "--config-file", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )
        if not self._wait_ready():
            self._kill()
            raise ClamdServerError(self.log_tail() or "no output")

    def log_tail(self) -> str:
        text = ""
        for name in ("clamd.out", "clamd.log"):
            with contextlib.suppress(OSError):
                text += (self.root / name).read_text(errors="replace")[-3000:]
        return text

    def _ping(self, family: int, address: object) -> bool:
        with contextlib.suppress(OSError):
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(address)
                s.sendall(b"zPING\0")
                return s.recv(64).startswith(b"PONG")
        return False

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if self._ping(socket.AF_UNIX, self.socket_path) and self._ping(
                socket.AF_INET, ("127.0.0.1", self.port)
            ):
                return True
            time.sleep(0.1)
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

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """Stops clamd; its sockets refuse connections until :meth:`resume`."""
        self._kill()
        Path(self.socket_path).unlink(missing_ok=True)

    def resume(self) -> None:
        self._spawn()

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.root, ignore_errors=True)


_SHARED: list[ClamdServer] = []


def _stop_shared() -> None:
    while _SHARED:
        _SHARED.pop().stop()


def shared_server() -> ClamdServer:
    """One clamd for the whole test session, whichever modules use it (started
    on first use, stopped when the process exits), running again if a test
    paused it. Raises ClamdServerError with clamd's log: the test fails."""
    if not _SHARED:
        _SHARED.append(ClamdServer.start())
        atexit.register(_stop_shared)
    server = _SHARED[0]
    if not server.running:
        server.resume()
    return server


@pytest.fixture
def clamd() -> ClamdServer:
    """The session's clamd (:func:`shared_server`), up and answering."""
    return shared_server()
