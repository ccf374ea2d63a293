"""A whole site for the attachment-storage tests: `mailctl serve` on free
loopback ports over a data folder (blobs on disk, or in an S3 bucket of
the shared Swift), `mailctl` commands run against the same configuration,
and real clients (smtplib, imaplib, poplib, urllib) to talk to it."""

from __future__ import annotations

import base64
import imaplib
import json
import os
import poplib
import signal
import smtplib
import ssl
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

from tests.integration.test_serve import free_port, stop, wait_ready
from tests.swiftserver import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, SwiftServer

PORTS = (
    "smtp.mx_listen", "smtp.submission_listen", "smtp.submissions_listen", "imap.listen",
    "imap.tls_listen", "pop3.listen", "pop3.tls_listen", "http.listen",
)  # fmt: skip


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the site's generated self-signed certificate
    return ctx


class Site:
    """One site's configuration, daemons and clients."""

    def __init__(self, tmp: Path, backend: str, *options: str) -> None:
        self.data = tmp / "data"
        self.env = dict(os.environ)
        self.options = ["-o", f"server.data_dir={self.data}"]
        if backend == "s3":
            swift = SwiftServer.shared()  # fails with the daemons' logs if it cannot start
            url = f"s3://{BUCKET}/t-{uuid.uuid4().hex}?endpoint={swift.endpoint}&region={REGION}"
            self.options += ["-o", f"storage.blob_url={url}"]
            self.env |= {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        for option in options:
            self.options += ["-o", option]
        self.ports = {key: free_port() for key in PORTS}
        self.proc: subprocess.Popen[str] | None = None

    @property
    def blob_dir(self) -> Path:
        return self.data / "blobs"

    def mailctl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """``mailctl`` with this site's options; the caller checks the status."""
        return subprocess.run(
            [sys.executable, "-m", "mailctl", args[0], *self.options, *args[1:]],
            input=stdin, capture_output=True, text=True, env=self.env, timeout=600,
        )  # fmt: skip

    def must(self, *args: str, stdin: str | None = None) -> str:
        done = self.mailctl(*args, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def add_accounts(self, addresses: list[str], password: str) -> None:
        domains = sorted({a.split("@")[1] for a in addresses})
        for domain in domains:
            self.must("domain", "add", domain)
        for address in addresses:
            self.must("account", "add", address, stdin=f"{password}\n")

    def start(self) -> None:
        args = [sys.executable, "-m", "mailctl", "serve", *self.options]
        for key, port in self.ports.items():
            args += ["-o", f"{key}=['127.0.0.1:{port}']"]
        self.proc = subprocess.Popen(
            args, stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True
        )
        wait_ready(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            assert stop(proc) == 0

    def kill(self) -> None:
        """SIGKILL to every process of the site (the daemons and workers)."""
        if self.proc is not None:
            proc, self.proc = self.proc, None
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.ports["smtp.mx_listen"], timeout=120)

    def imap(self, user: str, password: str) -> imaplib.IMAP4_SSL:
        imap = imaplib.IMAP4_SSL("127.0.0.1", self.ports["imap.tls_listen"], ssl_context=_tls())
        imap.login(user, password)
        return imap

    def pop3(self, user: str, password: str) -> poplib.POP3_SSL:
        pop = poplib.POP3_SSL("127.0.0.1", self.ports["pop3.tls_listen"], context=_tls(),
                              timeout=120)  # fmt: skip
        pop.user(user)
        pop.pass_(password)
        return pop

    def api(self, user: str, password: str, path: str) -> bytes:
        """GET ``path`` of the HTTP API with Basic credentials; its body."""
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports['http.listen']}{path}",
            headers={"Authorization": f"Basic {token}"},
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200
            return bytes(answer.read())

    def api_raw_messages(self, user: str, password: str) -> list[bytes]:
        """Every INBOX message's ``/raw`` download, in the list's order."""
        folders = json.loads(self.api(user, password, "/v1/folders"))["folders"]
        (inbox,) = [f["id"] for f in folders if f["name"] == "INBOX"]
        out, cursor = [], ""
        while True:
            page = json.loads(
                self.api(user, password, f"/v1/folders/{inbox}/messages?limit=100{cursor}")
            )
            out += [self.api(user, password, f"/v1/messages/{m['id']}/raw")
                    for m in page["messages"]]  # fmt: skip
            if not page.get("next_cursor"):
                return out
            cursor = f"&cursor={page['next_cursor']}"
