"""A throwaway Dovecot IMAP server on loopback, for benchmarks against a peer.

Debian's ``dovecot-imapd`` (``apt-get install -y dovecot-imapd``) runs in
the foreground (``dovecot -F -c CONF``) from a config written into a
temporary directory: listens on 127.0.0.1 on a free port (and, with
``tls=True``, implicit TLS on a second one, RFC 8314, with a self-signed
certificate made by ``conf.tls``), plaintext LOGIN allowed, users and
passwords in a passwd-file, mail in ``maildir:ROOT/mail/%u``, every
runtime path (base_dir, state_dir, logs) inside the temporary directory.
Nothing of the system's /etc/dovecot is read, and nothing is left behind
after :meth:`DovecotPeer.stop`.

Run as root, Dovecot needs unprivileged users for its login and internal
processes (``dovenull`` and ``dovecot``, created by the package) and a
non-root owner for mail; the maildirs are chowned to ``dovecot``. Run as
another user, every process runs as that user.

Never part of the test run; used by ``bench/imap_bench.py --compare-dovecot``
and usable alone::

    python -m bench.dovecot_peer --users 2 --messages 10   # starts, prints the port, waits
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
from collections.abc import Iterable
from pathlib import Path

DOVECOT = "dovecot"


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int, with_children: bool = True) -> float:
    """utime + stime of one process (all its threads) from /proc/PID/stat,
    plus the CPU of its children it has already reaped (cutime + cstime)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name is in parentheses and may hold spaces: split after it.
    fields = raw[raw.rindex(b")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    if with_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def hashed(scheme: str, password: str) -> str:
    """``{SCHEME}hash`` of ``password`` as ``doveadm pw`` makes it (Dovecot's
    default cost for the scheme: ARGON2ID is m=65536,t=3,p=1 in 2.3)."""
    out = subprocess.run(
        ["doveadm", "pw", "-s", scheme, "-p", password],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant of it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def proc_memory_kib(pids: Iterable[int]) -> tuple[int, int]:
    """(PSS, RSS) in KiB summed over ``pids``, from /proc/PID/smaps_rollup
    (PSS shares each page among the processes mapping it, so the sum over a
    process tree counts shared libraries and copy-on-write pages once).
    Processes gone meanwhile count nothing."""
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return pss, rss


def peak_rss_kib(pid: int) -> int:
    """VmHWM of one process: its peak resident set since it started, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def tree_cpu_seconds(root: int) -> float:
    """CPU used so far by ``root``, its live descendants and the children
    they reaped (a finished imap process's CPU moves to its parent's
    cutime when Dovecot's master waits for it)."""
    total = 0.0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError):
            total += proc_cpu_seconds(pid, with_children=True)
    return total


class DovecotPeer:
    """One Dovecot instance in its own temporary directory.

    Contract: fill the maildirs with :meth:`add_user` / :meth:`add_messages`
    before :meth:`start` (Dovecot indexes them on first SELECT); ``start``
    returns once the IMAP port accepts connections or raises with the log;
    :meth:`stop` ends every Dovecot process and removes the directory.
    """

    def __init__(
        self,
        root: Path | None = None,
        port: int | None = None,
        *,
        tls: bool = False,
        imap_client_limit: int | None = None,
        max_connections: int = 1000,
    ) -> None:
        """``tls``: also listen with implicit TLS on :attr:`tls_port`.
        ``imap_client_limit``: clients one imap process serves at once
        (Dovecot's default is 1, a process per client; ``service_count = 0``
        then lets a process serve client after client); with it the login processes
        run in performance mode (``service_count = 0``: a few long-lived
        processes, which also proxy TLS), as a site with many idle clients
        would run them. ``max_connections``: concurrent connections to allow
        (from one address and per user too: the bench's all come from
        127.0.0.1)."""
        if shutil.which(DOVECOT) is None and not Path("/usr/sbin/dovecot").exists():
            raise RuntimeError("dovecot not installed: apt-get install -y dovecot-imapd")
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="dovecot-peer-"))
        self.port = port or free_port()
        self.tls_port = free_port() if tls else 0
        self.imap_client_limit = imap_client_limit
        self.max_connections = max_connections
        self.users: dict[str, str] = {}  # login -> passwd-file password field
        self.proc: subprocess.Popen[bytes] | None = None
        self._counter = 0
        self.is_root = os.geteuid() == 0
        if self.is_root:
            # Login processes run as dovenull, internal ones and mail as dovecot.
            self.login_user, self.internal_user, self.mail_user = "dovenull", "dovecot", "dovecot"
        else:
            me = pwd.getpwuid(os.geteuid()).pw_name
            self.login_user = self.internal_user = self.mail_user = me
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the login and internal users must reach base_dir

    @property
    def conf_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    # -------------------------------------------------------------- contents
    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user

    def add_user(self, user: str, password: str, scheme: str = "PLAIN") -> None:
        """A login with an empty Maildir INBOX; its password is stored in the
        passwd-file under ``scheme`` (PLAIN, or any ``doveadm pw -s`` scheme:
        SHA512-CRYPT, ARGON2ID, ... at doveadm's default cost)."""
        if ":" in user or ":" in password or "\n" in user + password:
            raise ValueError("user and password may not hold ':' or newlines")
        self.users[user] = f"{{PLAIN}}{password}" if scheme == "PLAIN" else hashed(scheme, password)
        for sub in ("cur", "new", "tmp"):
            (self.maildir(user) / sub).mkdir(parents=True, exist_ok=True)

    def add_messages(
        self, user: str, messages: Iterable[bytes], seen: bool = False, when: float | None = None
    ) -> int:
        """Write messages straight into the user's Maildir ``cur/`` (the
        same bytes the other server gets); returns how many. ``when`` is the
        internal date (file mtime), default now."""
        base = int(when if when is not None else time.time())
        count = 0
        for raw in messages:
            self._counter += 1
            # Maildir++ name with S= (size) so Dovecot needs no stat for RFC822.SIZE.
            flags = "S" if seen else ""
            name = f"{base}.M{self._counter}P{os.getpid()}.bench,S={len(raw)}:2,{flags}"
            path = self.maildir(user) / "cur" / name
            path.write_bytes(raw)
            os.utime(path, (base, base))
            count += 1
        return count

    # ----------------------------------------------------------------- config
    def config_text(self) -> str:
        r = self.root
        mail = pwd.getpwnam(self.mail_user)
        if self.tls_port:
            from conf.tls import ensure_self_signed

            cert, key = ensure_self_signed(r / "tls", "localhost")
            ssl_lines = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n"
        else:
            ssl_lines = "ssl = no\n"
        limit = self.max_connections
        services = ""
        if self.imap_client_limit:
            services = f"""service imap {{
  service_count = 0
  client_limit = {self.imap_client_limit}
  process_limit = {limit // self.imap_client_limit + 10}
}}
service imap-login {{
  service_count = 0
  process_min_avail = {os.cpu_count() or 1}
  client_limit = {limit + 100}
}}
"""
        return f"""# Written by bench/dovecot_peer.py; throwaway benchmark peer.
protocols = imap
listen = 127.0.0.1
base_dir = {r}/run
state_dir = {r}/state
instance_name = bench-dovecot-{self.port}
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
{ssl_lines}disable_plaintext_auth = no
default_client_limit = {limit + 100}
auth_mechanisms = plain login
default_internal_user = {self.internal_user}
default_login_user = {self.login_user}
first_valid_uid = {mail.pw_uid}
first_valid_gid = {mail.pw_gid}
mail_location = maildir:{r}/mail/%u
mail_home = {r}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {r}/users
}}
userdb {{
  driver = static
  args = uid={mail.pw_uid} gid={mail.pw_gid}
}}
# Every bench session comes from 127.0.0.1, many on one user (the shared
# layout, the churn phase): the default of 10 per user and IP refuses them.
protocol imap {{
  mail_max_userip_connections = {limit}
}}
{services}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
{"    ssl = yes" if self.tls_port else ""}
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""

    def _write_config(self) -> None:
        users = "".join(f"{u}:{p}::::::\n" for u, p in self.users.items())
        (self.root / "users").write_text(users)
        (self.root / "users").chmod(0o644)
        self.conf_path.write_text(self.config_text())
        if self.is_root:
            mail = pwd.getpwnam(self.mail_user)
            for dirpath, _dirs, files in os.walk(self.root / "mail"):
                os.chown(dirpath, mail.pw_uid, mail.pw_gid)
                for name in files:
                    os.chown(os.path.join(dirpath, name), mail.pw_uid, mail.pw_gid)

    # --------------------------------------------------------------- running
    def start(self, timeout: float = 20.0) -> None:
        """Run ``dovecot -F -c CONF`` and wait until the IMAP port answers."""
        self._write_config()
        log = open(self.root / "dovecot.stderr", "wb")
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(200).startswith(b"* OK"):
                        return
            except OSError:
                time.sleep(0.1)
        self.stop(keep=True)
        raise RuntimeError(f"dovecot did not start; see {self.root}:\n{self.logs()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU used by every Dovecot process so far (master, login, auth,
        imap, ...), including those already finished."""
        return tree_cpu_seconds(self.pid)

    def logs(self) -> str:
        out = []
        for name in ("dovecot.stderr", "dovecot.log"):
            path = self.root / name
            if path.exists():
                out.append(path.read_text(errors="replace")[-4000:])
        return "\n".join(out)

    def stop(self, keep: bool = False) -> None:
        """End Dovecot (SIGTERM to its master, which stops its children;
        SIGKILL to the process group after 10 s) and remove the directory
        unless ``keep`` or the caller gave it."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if not keep and self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> DovecotPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run a throwaway Dovecot IMAP server")
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--messages", type=int, default=0, help="messages per user")
    parser.add_argument("--password", default="benchpass")
    args = parser.parse_args()

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # stop Dovecot on SIGTERM too
    with DovecotPeer() as peer:
        for n in range(args.users):
            user = f"user{n}@example.org"
            peer.add_user(user, args.password)
            body = b"Subject: test %d\r\nFrom: a@example.org\r\n\r\nhello\r\n"
            peer.add_messages(user, (body % i for i in range(args.messages)))
        peer.start()
        print(f"dovecot on 127.0.0.1:{peer.port}, root {peer.root}; Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
