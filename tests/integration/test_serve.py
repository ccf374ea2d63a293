"""`mailctl serve`: the whole daemon set in one process, as the README starts it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greeting(port: int, tls: bool) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the generated self-signed certificate
        sock = ctx.wrap_socket(sock)
    with sock:
        return sock.recv(512)


def test_serve_starts_every_daemon_and_stops_on_sigterm(tmp_path: Path) -> None:
    ports = {key: free_port() for key in [*LISTENERS, *TLS_LISTENERS, "http.listen"]}
    args = [sys.executable, "-m", "mailctl", "serve", "-o", f"server.data_dir={tmp_path / 'd'}"]
    for key, port in ports.items():
        args += ["-o", f"{key}=['127.0.0.1:{port}']"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "shardmail ready" in line or not line:
                break
        assert "shardmail ready: mtad imapd httpapi" in lines[-1], "".join(lines)

        for key, expected in LISTENERS.items():
            assert greeting(ports[key], tls=False).startswith(expected), key
        for key, expected in TLS_LISTENERS.items():
            assert greeting(ports[key], tls=True).startswith(expected), key
        url = f"http://127.0.0.1:{ports['http.listen']}/healthz"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
        # First start generated the self-signed certificate.
        assert (tmp_path / "d" / "tls" / "cert.pem").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
