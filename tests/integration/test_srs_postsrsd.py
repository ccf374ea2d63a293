"""Our SRS addresses are the ones PostSRSd (Debian's, the forwarder most
Postfix sites run) makes and reads: same secret, same domain, byte for
byte, so a site can move between the two, or run both, without bouncing
mail that is on its way back. PostSRSd runs on loopback with its TCP
lookup tables (Postfix's tcp_table protocol: ``get KEY`` -> ``200 VALUE``)."""

from __future__ import annotations

import random
import shutil
import socket
import string
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from delivery.srs import Srs, SrsError
from tests.ports import free_port

POSTSRSD = shutil.which("postsrsd") or "/usr/sbin/postsrsd"
DOMAIN = "fwd.example"


class Tables:
    def __init__(self, forward_port: int, reverse_port: int) -> None:
        self.forward_port, self.reverse_port = forward_port, reverse_port

    @staticmethod
    def _get(port: int, key: str) -> str | None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"get {quote(key, safe='@=+-._')}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        code, _, value = reply.decode().strip().partition(" ")
        return unquote(value) if code == "200" else None

    def forward(self, address: str) -> str | None:
        return self._get(self.forward_port, address)

    def reverse(self, address: str) -> str | None:
        return self._get(self.reverse_port, address)


@pytest.fixture
def postsrsd(tmp_path: Path) -> Iterator[tuple[Tables, bytes]]:
    secret = "".join(random.choices(string.ascii_letters + string.digits, k=40)).encode()
    (tmp_path / "secret").write_bytes(secret + b"\n")
    forward_port, reverse_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            POSTSRSD,
            f"-s{tmp_path / 'secret'}",
            f"-d{DOMAIN}",
            "-l127.0.0.1",
            "-4",
            f"-f{forward_port}",
            f"-r{reverse_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", reverse_port), timeout=1).close()
                socket.create_connection(("127.0.0.1", forward_port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postsrsd did not start: {process.stderr.read()!r}"
                    ) from None
                time.sleep(0.05)
        yield Tables(forward_port, reverse_port), secret
    finally:
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()


def _address() -> str:
    local = "".join(
        random.choices(string.ascii_letters + string.digits + "._+-", k=random.randint(1, 30))
    )
    local = local.strip(".").replace("..", ".") or "x"
    labels = [
        "".join(random.choices(string.ascii_lowercase, k=random.randint(2, 10)))
        for _ in range(random.randint(2, 3))
    ]
    return f"{local}@{'.'.join(labels)}"


def test_same_addresses_as_postsrsd_both_ways(postsrsd: tuple[Tables, bytes]) -> None:
    tables, secret = postsrsd
    ours = Srs(DOMAIN, (secret,))
    for _ in range(60):
        sender = _address()
        before = time.time()
        theirs = tables.forward(sender)
        after = time.time()
        assert theirs is not None
        assert theirs in {ours.forward(sender, before), ours.forward(sender, after)}
        assert ours.reverse(theirs) == sender
        assert tables.reverse(ours.forward(sender)) == sender
        # A second hop: an SRS0 address of another forwarder becomes SRS1.
        other = Srs("first.example", (random.randbytes(16),))
        hop1 = other.forward(sender)
        theirs1 = tables.forward(hop1)
        assert theirs1 is not None and theirs1.startswith("SRS1=")
        assert theirs1 == ours.forward(hop1)
        assert ours.reverse(theirs1) == hop1
        assert tables.reverse(ours.forward(hop1)) == hop1
    # What one refuses, the other refuses: a forged hash.
    made = ours.forward("alice@origin.example")
    local, _, domain = made.rpartition("@")
    parts = local.split("=")
    parts[1] = "AAAA" if parts[1].upper() != "AAAA" else "BBBB"
    forged = "=".join(parts) + "@" + domain
    assert tables.reverse(forged) is None
    with pytest.raises(SrsError):
        ours.reverse(forged)
