"""Postfix relaying to one next hop, signing with OpenDKIM as a milter: the
reference relay for ``bench/relay_bench.py``.

Debian's ``postfix`` and ``opendkim`` (``apt-get install -y postfix
opendkim opendkim-tools``) run from throwaway configs in temporary
directories, on loopback only:

* OpenDKIM (``opendkim -f -x CONF``, in the foreground, a child of this
  process) in signing mode (``Mode s``) for ``domain`` with the given PEM
  key and selector, relaxed/relaxed and rsa-sha256 like
  ``mtad/outbound/signing.py``, signing the same header fields; its milter
  socket is ``inet:PORT@127.0.0.1``. It signs mail from its default
  ``InternalHosts`` (127.0.0.1), where the bench submits.
* Postfix (the config of ``tests/postfixpeer.py``: smtpd on
  ``127.0.0.1:PORT``, chroot off, no DNS for the peer) with
  ``smtpd_milters`` pointing at OpenDKIM (``milter_default_action =
  tempfail``: never unsigned) and every message relayed to
  ``relayhost = [next_hop]:port``; clients in 127.0.0.0/8 may relay
  (``mynetworks``), without AUTH (Postfix has no SASL of its own).
  Otherwise Postfix's defaults: destination concurrency up to 20, sessions
  cached and reused while mail for the next hop is waiting.

:meth:`PostfixDkimRelay.cpu_seconds` is the CPU of every Postfix process
(the master's tree, with the children it reaped) plus OpenDKIM's (all its
threads). :meth:`PostfixDkimRelay.stop` ends both and removes the
directories. Never part of the test run.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.dovecot_peer import free_port, proc_cpu_seconds, tree_cpu_seconds
from mtad.outbound.signing import SIGNED_HEADERS
from tests.postfixpeer import PostfixPeer, start_postfix, stop_postfix

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"

OPENDKIM_CONF = """\
Syslog no
Background no
Mode s
Domain {domain}
Selector {selector}
KeyFile {key_file}
# The key sits below /tmp, which anyone can write: the bench's own key.
RequireSafeKeys false
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
SignHeaders {sign_headers}
Socket inet:{port}@127.0.0.1
PidFile {base}/opendkim.pid
"""


class PostfixDkimRelay:
    """Postfix on ``127.0.0.1:port`` relaying everything to
    ``next_hop:next_port``, each message signed by OpenDKIM as ``domain``.

    Contract: :meth:`start` returns once OpenDKIM's milter socket and
    Postfix's SMTP port answer, or raises with the logs (leaving nothing
    running); :meth:`stop` ends both and removes their directories.
    """

    def __init__(
        self,
        domain: str,
        key_pem: bytes,
        selector: str,
        next_hop: str,
        next_port: int,
        *,
        dkim: bool = True,
    ) -> None:
        self.domain = domain
        self.key_pem = key_pem
        self.selector = selector
        self.next_hop = next_hop
        self.next_port = next_port
        self.dkim = dkim
        self.port = free_port()
        self.milter_port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="relay-bench-opendkim-"))
        self.opendkim: subprocess.Popen[bytes] | None = None
        self.postfix: PostfixPeer | None = None

    def start(self, timeout: float = 30.0) -> None:
        try:
            if self.dkim:
                self._start_opendkim(timeout)
            milter = f"smtpd_milters = inet:127.0.0.1:{self.milter_port}\n" if self.dkim else ""
            self.postfix = start_postfix(
                self.domain,
                "127.0.0.1",
                self.port,
                timeout=timeout,
                extra=(
                    f"relayhost = [{self.next_hop}]:{self.next_port}\n"
                    "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
                    f"{milter}milter_default_action = tempfail\n"
                ),
            )
        except BaseException:
            self.stop()
            raise

    def _start_opendkim(self, timeout: float) -> None:
        key_file = self.base / f"{self.domain}.{self.selector}.key"
        key_file.write_bytes(self.key_pem)
        key_file.chmod(0o600)
        conf = self.base / "opendkim.conf"
        conf.write_text(
            OPENDKIM_CONF.format(
                domain=self.domain,
                selector=self.selector,
                key_file=key_file,
                sign_headers=",".join(h.decode() for h in SIGNED_HEADERS),
                port=self.milter_port,
                base=self.base,
            )
        )
        log = (self.base / "opendkim.log").open("wb")
        self.opendkim = subprocess.Popen(
            [OPENDKIM, "-f", "-x", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.opendkim.poll() is not None:
                break
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.milter_port), timeout=0.5).close()
                return
            time.sleep(0.1)
        raise RuntimeError(f"opendkim did not start: {self.opendkim_log()}")

    def opendkim_log(self) -> str:
        path = self.base / "opendkim.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def postfix_log(self) -> str:
        return self.postfix.log() if self.postfix is not None else ""

    def _master_pid(self) -> int | None:
        if self.postfix is None:
            return None
        pid_file = self.postfix.base / "queue" / "pid" / "master.pid"
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu_seconds(self) -> tuple[float, float]:
        """(Postfix, OpenDKIM) utime+stime so far: Postfix's master, its
        live children and the children it reaped; OpenDKIM's threads."""
        pid = self._master_pid()
        postfix = tree_cpu_seconds(pid) if pid is not None else 0.0
        milter = 0.0
        if self.opendkim is not None and self.opendkim.poll() is None:
            milter = proc_cpu_seconds(self.opendkim.pid, with_children=False)
        return postfix, milter

    def stop(self) -> None:
        """``postfix stop`` (waits for its master), then OpenDKIM (SIGTERM
        to the child we started); removes both directories."""
        peer, self.postfix = self.postfix, None
        try:
            if peer is not None:
                stop_postfix(peer)
        finally:
            milter, self.opendkim = self.opendkim, None
            if milter is not None and milter.poll() is None:
                milter.terminate()
                try:
                    milter.wait(10)
                except subprocess.TimeoutExpired:
                    milter.kill()
                    milter.wait()
            shutil.rmtree(self.base, ignore_errors=True)
