"""Debian's Postfix as a receiving MTA on a loopback address, for tests.

Usage::

    with postfix_peer("postfix.test", "127.0.0.3", port) as peer:
        ...                                  # deliver mail to anyone@postfix.test
        peer.wait_for_messages(1)            # -> [bytes, ...] (Maildir files)

Postfix runs from its own config, queue and data directories in a fresh
folder under /tmp (not under pytest's 0700 tmp tree: Postfix's daemons run
as the ``postfix`` user and must reach their queue). ``smtpd`` listens on
``address:port`` only; every address of ``domain`` is delivered by the
``virtual`` agent into one Maildir (``static:`` map), which the test reads.
``postfix -c DIR start``/``stop`` run it; ``stop`` also removes the folder.
Install: ``apt-get install -y postfix`` (debconf "No configuration").
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
DAEMON_DIR = "/usr/lib/postfix/sbin"

# Only the services a receiving MTA needs; chroot off ("n") everywhere.
MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {base}/etc
queue_directory = {base}/queue
data_directory = {base}/data
daemon_directory = {daemon_dir}
command_directory = /usr/sbin
mail_owner = postfix
myhostname = mx.{domain}
mydomain = {domain}
myorigin = $mydomain
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
relay_domains =
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {base}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP
biff = no
append_dot_mydomain = no
alias_maps =
alias_database =
maillog_file = {base}/maillog
maillog_file_prefixes = /tmp/shardmail-postfix-
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C
"""


@dataclass
class PostfixPeer:
    domain: str
    address: str
    port: int
    base: Path

    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    @property
    def maildir(self) -> Path:
        return self.base / "mail" / "inbox"

    def messages(self) -> list[bytes]:
        """Delivered messages, oldest first (Maildir new/ and cur/)."""
        files = [p for sub in ("new", "cur") for p in (self.maildir / sub).glob("*")]
        return [p.read_bytes() for p in sorted(files, key=lambda p: p.stat().st_mtime)]

    def wait_for_messages(self, count: int, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages()
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(
            f"postfix got {len(self.messages())} messages, wanted {count}:\n{self.log()}"
        )

    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )


def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"220")
    except OSError:
        return False


def start_postfix(
    domain: str,
    address: str,
    port: int,
    timeout: float = 30.0,
    extra: str = "",
    master_extra: str = "",
) -> PostfixPeer:
    """Start Postfix receiving mail for ``domain`` on ``address:port``;
    ``extra`` main.cf lines are appended (a ``relayhost`` makes it a sender),
    ``master_extra`` master.cf lines too (a policy service)."""
    base = Path(tempfile.mkdtemp(prefix="shardmail-postfix-"))
    os.chmod(base, 0o755)
    postfix_user = pwd.getpwnam("postfix")
    for sub in ("etc", "queue", "data", "mail"):
        (base / sub).mkdir()
    os.chown(base / "data", postfix_user.pw_uid, postfix_user.pw_gid)
    os.chown(base / "mail", postfix_user.pw_uid, postfix_user.pw_gid)
    (base / "etc" / "main.cf").write_text(
        MAIN_CF.format(
            base=base,
            daemon_dir=DAEMON_DIR,
            domain=domain,
            address=address,
            uid=postfix_user.pw_uid,
            gid=postfix_user.pw_gid,
        )
        + extra
    )
    (base / "etc" / "master.cf").write_text(
        MASTER_CF.format(listen=f"{address}:{port}") + master_extra
    )
    peer = PostfixPeer(domain, address, port, base)
    result = peer.postfix("start")
    if result.returncode != 0:
        first = f"{result.stdout}{result.stderr}"
        # postfix(1) reports to syslog or to a terminal only: ask again on a pty.
        result = subprocess.run(
            ["script", "-q", "/dev/null", "-c", f"{POSTFIX} -c {peer.config_dir} check"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"postfix start failed: {first}{result.stdout}{result.stderr}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(address, port):
            return peer
        time.sleep(0.1)
    log = peer.log()
    stop_postfix(peer)
    raise RuntimeError(f"postfix did not listen on {address}:{port}: {log}")


def stop_postfix(peer: PostfixPeer) -> None:
    """``postfix stop`` (master and its children exit), then remove the
    folder. A stop that does not end in time (once, under load, ``postfix
    stop`` itself outlived 60 s) ends with SIGKILL to the master's process
    group (the master is a session leader; its children share the group),
    so a peer's shutdown never fails a test."""
    pid_file = peer.base / "queue" / "pid" / "master.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    try:
        # No pipes: a process left holding one would keep run() waiting.
        subprocess.run(
            [POSTFIX, "-c", str(peer.config_dir), "stop"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # the master we started, by its pid
        except ProcessLookupError:
            pid = None
            break
        time.sleep(0.05)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(peer.base, ignore_errors=True)


@contextlib.contextmanager
def postfix_peer(
    domain: str,
    address: str,
    port: int,
    extra: str = "",
    master_extra: str = "",
) -> Iterator[PostfixPeer]:
    peer = start_postfix(domain, address, port, extra=extra, master_extra=master_extra)
    try:
        yield peer
    finally:
        stop_postfix(peer)


__all__ = ["PostfixPeer", "postfix_peer", "start_postfix", "stop_postfix"]
