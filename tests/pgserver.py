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
not crash safety.
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
from pathlib import Path

import asyncpg

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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """A running test server; ``stop()`` kills it and removes its files."""

    def __init__(self, root: Path, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.port = port
        self.proc = proc
        self.user = "postgres"
        self._template: str | None = None

    @classmethod
    def start(cls) -> PgServer:
        bindir = find_bindir()
        root = Path(tempfile.mkdtemp(prefix="shardmail-pg-"))
        run_as: dict[str, object] = {}
        if os.geteuid() == 0:
            # initdb refuses to run as root.
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PgServerError("running as root but there is no postgres user") from None
            os.chown(root, pw.pw_uid, pw.pw_gid)
            run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        data = root / "data"
        env = {**os.environ, "LC_ALL": "C.UTF-8", "HOME": str(root)}
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            capture_output=True,
            env=env,
            cwd=root,
            **run_as,  # type: ignore[arg-type]
        )
        if init.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise PgServerError(f"initdb failed: {init.stderr.decode(errors='replace')}")
        last_error = ""
        for _attempt in range(3):
            port = _free_port()
            log = open(root / "postgres.log", "ab")
            proc = subprocess.Popen(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-k",
                    str(root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "shared_buffers=64MB",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=root,
                **run_as,  # type: ignore[arg-type]
            )
            log.close()
            server = cls(root, port, proc)
            if server._wait_ready():
                return server
            proc.kill()
            proc.wait()
            last_error = (root / "postgres.log").read_text(errors="replace")[-2000:]
        shutil.rmtree(root, ignore_errors=True)
        raise PgServerError(f"postgres did not start: {last_error}")

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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: ends sessions
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
