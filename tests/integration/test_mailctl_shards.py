"""mailctl and the storage roles of issue #19, as a sysadmin runs it: a
subprocess with a config file; check-config names each database by role,
``shard list`` shows each shard's accounts, messages, bytes and health."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def _dead_pg_url() -> str:
    """A PostgreSQL URL on a loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"postgresql+asyncpg://postgres@127.0.0.1:{probe.getsockname()[1]}/mail"


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shardmail.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n{text}')
    return path


def mailctl(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailctl", "-c", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_config_reports_each_database_by_role(tmp_path: Path) -> None:
    dead = _dead_pg_url()
    config = _config(
        tmp_path,
        f"""
[storage]
url = "sqlite+aiosqlite:///{tmp_path / "directory.db"}"
[storage.shards.default]
url = "sqlite+aiosqlite:///{tmp_path / "default.db"}"
[storage.shards.far]
url = "{dead}"
""",
    )
    result = mailctl(config, "check-config")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("directory: OK") and "directory.db" in line for line in lines)
    assert any(line.startswith("shard default: OK") and "default.db" in line for line in lines)
    assert "shard far" not in result.stdout
    assert "shard far: cannot connect to" in result.stderr
    assert "directory" not in result.stderr


def test_check_config_names_an_unreachable_directory(tmp_path: Path) -> None:
    config = _config(tmp_path, f'[storage]\nurl = "{_dead_pg_url()}"\n')
    result = mailctl(config, "check-config")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "directory: cannot connect to" in result.stderr
    # Without a shard of its own, "default" is the directory's database: said once.
    assert "shard default: the directory's database" in result.stdout
