"""A throwaway PostgreSQL server for tests: initdb into a temp dir, start on
127.0.0.1 with a free port and a private socket dir, one database per test.

Reusable by any suite::

    from tests.pgserver import PgServer
    server = PgServer.start()          # raises PgServerError if it cannot
    url = await server.create_database()  # "postgresql+asyncpg://..."
    server.stop()

Binaries come from ``pg_config --bindir`` or /usr/lib/postgresql/*/bin. When
running as root (CI does), initdb and postgres run as user ``postgres``.
Durability is switched off (fsync, synchronous_commit): tests need speed,
not crash safety. ``PgServer.start(durable=True)`` keeps the server's
defaults (fsync, synchronous_commit, full_page_writes on): benchmarks, and
the zero-loss failover drill.

Failover drills::

    primary = PgServer.start(durable=True)
    replica = primary.start_replica(synchronous=True)  # pg_basebackup -R, streaming
    primary.kill()        # SIGKILL of every server process, files kept
    replica.promote()     # pg_ctl promote; returns once it takes writes
    primary.restart()     # same port and data (here: a second, diverged primary)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import asyncpg

from tests.ports import free_port as _free_port

START_TIMEOUT = 60.0


class PgServerError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The directory holding initdb and postgres."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], check=True, capture_output=True, text=True
            ).stdout.strip()
            candidates.append(Path(out))
    candidates.extend(Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    for path in candidates:
        if (path / "initdb").exists() and (path / "postgres").exists():
            return path
    raise PgServerError("PostgreSQL binaries (initdb, postgres) not found")


# Appended to every primary's postgresql.conf. A replica copies them.
PRIMARY_SETTINGS = {
    "max_connections": "300",
    "shared_buffers": "64MB",
    "wal_level": "replica",  # enough WAL for a streaming standby
    "max_wal_senders": "10",
    "hot_standby": "on",  # a standby answers reads
}
# Speed for tests that never crash the server.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# Crash safety: a commit returns once it is on disk (and on a sync standby).
DURABLE_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


def _make_root() -> tuple[Path, dict[str, object]]:
    """A temp dir for one server, and how to run its programs: as user
    ``postgres`` when we are root (initdb and postgres refuse root)."""
    root = Path(tempfile.mkdtemp(prefix="shardmail-pg-"))
    if os.geteuid() != 0:
        return root, {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        shutil.rmtree(root, ignore_errors=True)
        raise PgServerError("running as root but there is no postgres user") from None
    os.chown(root, pw.pw_uid, pw.pw_gid)
    return root, {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C.UTF-8", "HOME": str(root)}


def _run_tool(
    root: Path, run_as: dict[str, object], tool: str, *args: str, keep: bool = False
) -> None:
    """Runs a PostgreSQL program from the bindir in ``root``; when it
    fails, ``root`` is removed (unless ``keep``) and PgServerError raised."""
    done = subprocess.run(
        [str(find_bindir() / tool), *args],
        capture_output=True,
        env=_env(root),
        cwd=root,
        **run_as,  # type: ignore[arg-type]
    )
    if done.returncode != 0:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        raise PgServerError(f"{tool} failed: {done.stderr.decode(errors='replace')}")


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(stat) as f:
                # "pid (comm) state ppid ...": comm may hold spaces, split after it.
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.split("/")[2]))
    return found


@contextlib.contextmanager
def primary_with_replica(*, durable: bool = False) -> Iterator[tuple[PgServer, PgServer]]:
    """A primary and its synchronous streaming replica (commits wait for
    the replica's flush), both stopped and removed at the end.
    ``durable``: as :meth:`PgServer.start`."""
    primary = PgServer.start(durable=durable)
    try:
        replica = primary.start_replica(synchronous=True)
        try:
            yield primary, replica
        finally:
            replica.stop()
    finally:
        primary.stop()



class PgServer:
    """A running test server; ``stop()`` kills it and removes its files."""

    def __init__(self, root: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.port = port
        self.proc = proc
        self.user = "postgres"
        self.name = ""  # a replica's application_name (start_replica)
        self._template: str | None = None
        self._data = root / "data"
        self._run_as: dict[str, object] = {}
        self._extra: tuple[str, ...] = ()

    @classmethod
    def start(
        cls, *, durable: bool = False, settings: Mapping[str, str] | None = None
    ) -> PgServer:
        """initdb and start a primary. ``durable``: fsync and synchronous
        commits on (a crash loses nothing that was acknowledged); by default
        both are off, for speed. Either way the server accepts streaming
        replicas (:meth:`start_replica`). ``settings``: postgresql.conf
        parameters set after (so over) these, e.g. a benchmark's server
        sized as README's Production section recommends."""
        root, run_as = _make_root()
        data = root / "data"
        _run_tool(
            root,
            run_as,
            "initdb",
            "-D",
            str(data),
            "-U",
            "postgres",
            # trust, also for "replication" from 127.0.0.1: initdb's pg_hba.conf
            # lets any local user stream WAL (pg_basebackup, walreceiver).
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        # In postgresql.conf, not on the command line: ALTER SYSTEM (read
        # after it) may then change them, as start_replica does.
        conf_settings = {
            **PRIMARY_SETTINGS,
            **(DURABLE_SETTINGS if durable else FAST_SETTINGS),
            **(settings or {}),
        }
        with open(data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = '{value}'\n" for key, value in conf_settings.items())
        return cls._launch(root, data, run_as)

    @classmethod
    def _launch(
        cls, root: Path, data: Path, run_as: dict[str, object], extra: tuple[str, ...] = ()
    ) -> PgServer:
        """Starts postgres on ``data`` on a free port (three tries)."""
        last_error = ""
        for _attempt in range(3):
            server = cls(root, _free_port(), None)  # type: ignore[arg-type]
            server._data, server._run_as, server._extra = data, run_as, extra
            server.proc = server._spawn()
            if server._wait_ready():
                return server
            server.proc.kill()
            server.proc.wait()
            last_error = (root / "postgres.log").read_text(errors="replace")[-2000:]
        shutil.rmtree(root, ignore_errors=True)
        raise PgServerError(f"postgres did not start: {last_error}")

    def _spawn(self) -> subprocess.Popen[bytes]:
        log = open(self.root / "postgres.log", "ab")
        try:
            return subprocess.Popen(
                [
                    str(find_bindir() / "postgres"),
                    "-D",
                    str(self._data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    *self._extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(self.root),
                cwd=self.root,
                **self._run_as,  # type: ignore[arg-type]
            )
        finally:
            log.close()

    def start_replica(self, *, synchronous: bool = False) -> PgServer:
        """A streaming standby of this server (``pg_basebackup -R``) on a
        free port, hot (it answers reads), streaming before this returns.

        ``synchronous``: this server's ``synchronous_standby_names`` names
        the replica and its commits wait for the replica's flush
        (``synchronous_commit = on``): a commit acknowledged here survives
        a SIGKILL of this server once the replica is promoted. Set after
        the copy, so the replica does not inherit it (promoted, it would
        wait for a standby it does not have)."""
        root, run_as = _make_root()
        data = root / "data"
        name = f"replica_{root.name.rsplit('-', 1)[-1].lower()}"
        _run_tool(
            root,
            run_as,
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(self.port), "-U", self.user),
            *("-D", str(data), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"),
        )
        # cluster_name is the walreceiver's application_name: the name
        # synchronous_standby_names refers to.
        replica = self._launch(root, data, run_as, ("-c", f"cluster_name={name}"))
        replica.name = name
        self._wait_for(
            f"SELECT state FROM pg_stat_replication WHERE application_name = '{name}'", "streaming"
        )
        if synchronous:
            self.sql(
                "ALTER SYSTEM SET synchronous_commit = 'on'",
                "ALTER SYSTEM SET fsync = 'on'",
                f"ALTER SYSTEM SET synchronous_standby_names = '\"{name}\"'",
                "SELECT pg_reload_conf()",
            )
            self._wait_for(
                f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'",
                "sync",
            )
        return replica

    def sql(self, *statements: str, database: str = "postgres") -> str:
        """Runs ``statements`` in ``database`` with psql as the superuser;
        returns the output of the last (unaligned, tuples only). Raises
        PgServerError."""
        args = [str(find_bindir() / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1"]
        args += ["-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", database]
        for statement in statements:
            args += ["-c", statement]
        done = subprocess.run(args, capture_output=True, text=True, env=_env(self.root))
        if done.returncode != 0:
            raise PgServerError(f"psql failed: {done.stderr}")
        return done.stdout.strip()

    def _wait_for(self, query: str, expected: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(PgServerError):
                if self.sql(query) == expected:
                    return
            time.sleep(0.05)
        raise PgServerError(f"{query!r} never returned {expected!r}")

    def wait_replayed(self, primary: PgServer) -> None:
        """Waits until this standby has applied all WAL ``primary`` wrote so
        far (a synchronous commit waits for the standby's flush, not for its
        replay: a database just created may not be visible there yet)."""
        lsn = primary.sql("SELECT pg_current_wal_lsn()")
        self._wait_for(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn", "t")

    def promote(self) -> None:
        """``pg_ctl promote`` this standby and wait until it takes writes."""
        _run_tool(
            self.root, self._run_as, "pg_ctl", "promote", "-w", "-D", str(self._data), keep=True
        )
        self._wait_for("SELECT pg_is_in_recovery()", "f")

    def kill(self) -> None:
        """SIGKILL the postmaster and every process of the server at once,
        as a crash of its host would: nothing is flushed, no session is
        told. Its files stay; :meth:`restart` starts it again."""
        self._signal_all(signal.SIGKILL)
        self.proc.wait()

    def freeze(self) -> None:
        """SIGSTOP every process of the server: it hangs, as a host that
        died without a word would look to its clients (connections stay
        open, nothing answers). :meth:`kill` still ends it."""
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT every process of a :meth:`freeze`-d server: it answers again."""
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def shutdown(self) -> None:
        """A fast shutdown (sessions end), keeping the files for :meth:`restart`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Starts the server again on its port and data (after :meth:`kill`
        or :meth:`shutdown`); raises PgServerError if it does not come up."""
        self.shutdown()
        self.proc = self._spawn()
        if not self._wait_ready():
            raise PgServerError("postgres did not restart")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                # Accepting TCP is not enough: wait until it accepts a session.
                check = subprocess.run(
                    [
                        str(find_bindir() / "pg_isready"),
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(self.port),
                        "-U",
                        "postgres",
                    ],
                    capture_output=True,
                )
                if check.returncode == 0:
                    return True
            time.sleep(0.1)
        return False

    def url(self, database: str) -> str:
        """A SQLAlchemy async URL for ``database`` on this server."""
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{database}"

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=self.user, database="postgres"
        )

    async def create_database(self, template: str | None = None) -> str:
        """A new empty database (or a copy of ``template``); returns its URL."""
        name = "t_" + uuid.uuid4().hex[:16]
        conn = await self._admin()
        try:
            if template:
                await conn.execute(
                    f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY'
                )
            else:
                await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    async def reset_database(self, url: str, keep: tuple[str, ...] = ("schema_version",)) -> None:
        """Empties every table of ``url`` except ``keep`` (much faster than a
        new database per test); sequences restart."""
        name = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=self.user, database=name
        )
        try:
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            tables = [r["tablename"] for r in rows if r["tablename"] not in keep]
            if tables:
                quoted = ", ".join(f'"{t}"' for t in tables)
                await conn.execute(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    async def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        conn = await self._admin()
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def stop(self) -> None:
        """A fast shutdown (ends sessions), then the files are removed."""
        self.shutdown()
        shutil.rmtree(self.root, ignore_errors=True)
