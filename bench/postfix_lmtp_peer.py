"""Postfix delivering to Dovecot over LMTP on loopback: the reference MTA
+ mailbox pair for ``bench/smtp_bench.py --compare-postfix``.

Debian's ``postfix`` and ``dovecot-lmtpd`` (``apt-get install -y postfix
dovecot-lmtpd``) run from throwaway configs in temporary directories:

* Dovecot (:class:`LmtpDovecot`, a :class:`bench.dovecot_peer.DovecotPeer`)
  adds ``protocols = imap lmtp`` and an LMTP unix socket (mode 0666, so
  Postfix's ``lmtp`` client, running as ``postfix``, can reach it); users in
  a passwd-file, a static userdb, mail in ``maildir:ROOT/mail/%u`` with the
  default ``mail_fsync=optimized`` (LMTP fsyncs each delivered message).
* Postfix (the receiving config of ``tests/postfixpeer.py``: smtpd on
  ``127.0.0.1:PORT`` only, no content filters, no DNS, chroot off) with
  ``virtual_mailbox_domains = DOMAIN`` and
  ``virtual_transport = lmtp:unix:SOCKET``. Postfix acknowledges at queue
  time (after fsync of its queue file, RFC 5321 section 6.1); delivery into
  the Maildir happens later, through qmgr -> lmtp -> Dovecot.

:meth:`PostfixLmtpPeer.stop` ends every Postfix and Dovecot process and
removes both directories. Never part of the test run. Alone::

    python -m bench.postfix_lmtp_peer          # starts, prints the port, waits
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from bench.dovecot_peer import DovecotPeer, free_port, tree_cpu_seconds
from tests.postfixpeer import DAEMON_DIR, MAIN_CF, MASTER_CF, PostfixPeer, stop_postfix


class LmtpDovecot(DovecotPeer):
    """Dovecot with an LMTP unix listener at :attr:`lmtp_socket` as well
    as the IMAP port (which ``start`` waits for)."""

    @property
    def lmtp_socket(self) -> Path:
        # Relative listener names resolve under base_dir (ROOT/run).
        return self.root / "run" / "lmtp"

    def config_text(self) -> str:
        text = super().config_text().replace("protocols = imap\n", "protocols = imap lmtp\n")
        return (
            text
            + """service lmtp {
  unix_listener lmtp {
    mode = 0666
  }
}
lmtp_rcpt_check_quota = no
"""
        )

    def delivered(self, user: str) -> int:
        """Messages in the user's Maildir (new/ and cur/)."""
        return sum(
            len(os.listdir(self.maildir(user) / sub))
            for sub in ("new", "cur")
            if (self.maildir(user) / sub).is_dir()
        )


class PostfixLmtpPeer:
    """Postfix on ``127.0.0.1:port`` handing mail for ``domain`` to Dovecot
    over LMTP.

    Contract: :meth:`add_user` before :meth:`start`; ``start`` returns once
    Dovecot's IMAP port and Postfix's SMTP port answer, or raises with the
    logs (and leaves nothing running); :meth:`delivered` counts messages in
    a user's Maildir; :meth:`cpu_seconds` is the CPU of every Postfix and
    Dovecot process so far (live ones plus reaped children); :meth:`stop`
    ends them all and removes the directories.
    """

    def __init__(self, domain: str, port: int | None = None) -> None:
        self.domain = domain
        self.port = port or free_port()
        self.dovecot = LmtpDovecot()
        self.postfix: PostfixPeer | None = None

    def add_user(self, address: str, password: str = "bench-password") -> None:
        self.dovecot.add_user(address, password)

    def delivered(self, address: str) -> int:
        return self.dovecot.delivered(address)

    def wait_delivered(self, address: str, count: int, timeout: float = 300.0) -> float:
        """Poll until ``address`` holds at least ``count`` messages; returns
        ``time.perf_counter()`` at that moment (20 ms resolution)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.delivered(address) >= count:
                return time.perf_counter()
            time.sleep(0.02)
        raise RuntimeError(
            f"only {self.delivered(address)} of {count} delivered to {address}:\n"
            f"{self.postfix.log()[-4000:] if self.postfix else ''}\n{self.dovecot.logs()}"
        )

    # ------------------------------------------------------------ running
    def start(self, timeout: float = 30.0) -> None:
        self.dovecot.start()
        try:
            self.postfix = self._start_postfix(timeout)
        except BaseException:
            self.dovecot.stop()
            raise

    def _start_postfix(self, timeout: float) -> PostfixPeer:
        # Under /tmp with the prefix MAIN_CF's maillog_file_prefixes allows;
        # Postfix's daemons run as ``postfix`` and must reach the queue.
        base = Path(tempfile.mkdtemp(prefix="shardmail-postfix-lmtp-"))
        base.chmod(0o755)
        owner = pwd.getpwnam("postfix")
        for sub in ("etc", "queue", "data", "mail"):
            (base / sub).mkdir()
        for sub in ("data", "mail"):
            os.chown(base / sub, owner.pw_uid, owner.pw_gid)
        main_cf = MAIN_CF.format(
            base=base,
            daemon_dir=DAEMON_DIR,
            domain=self.domain,
            address="127.0.0.1",
            uid=owner.pw_uid,
            gid=owner.pw_gid,
        )
        # virtual_mailbox_maps (static) still validates recipients at RCPT;
        # delivery goes to Dovecot instead of Postfix's own virtual agent.
        main_cf += f"virtual_transport = lmtp:unix:{self.dovecot.lmtp_socket}\n"
        (base / "etc" / "main.cf").write_text(main_cf)
        (base / "etc" / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        peer = PostfixPeer(self.domain, "127.0.0.1", self.port, base)
        result = peer.postfix("start")
        if result.returncode != 0:
            shutil.rmtree(base, ignore_errors=True)
            raise RuntimeError(f"postfix start failed: {result.stdout}{result.stderr}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    if sock.recv(4).startswith(b"220"):
                        return peer
            time.sleep(0.1)
        log = peer.log()
        stop_postfix(peer)
        raise RuntimeError(f"postfix did not listen on 127.0.0.1:{self.port}: {log}")

    def postfix_master_pid(self) -> int | None:
        if self.postfix is None:
            return None
        try:
            return int((self.postfix.base / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu_seconds(self) -> float:
        """utime+stime of every Postfix and Dovecot process (master trees;
        children that already exited count through their parent's cutime)."""
        total = self.dovecot.cpu_seconds()
        pid = self.postfix_master_pid()
        if pid is not None:
            total += tree_cpu_seconds(pid)
        return total

    def stop(self) -> None:
        """``postfix stop`` (waits for its master), then Dovecot; removes both
        directories."""
        peer, self.postfix = self.postfix, None
        try:
            if peer is not None:
                stop_postfix(peer)
        finally:
            self.dovecot.stop()

    def __enter__(self) -> PostfixLmtpPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    with PostfixLmtpPeer("bench.example") as peer:
        peer.add_user("user@bench.example")
        peer.start()
        print(
            f"postfix on 127.0.0.1:{peer.port} -> dovecot lmtp {peer.dovecot.lmtp_socket}; "
            f"Maildir {peer.dovecot.maildir('user@bench.example')}; Ctrl-C stops",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
