"""mailctl and the storage roles of issue #19, as a sysadmin runs it: a
subprocess with a config file; check-config names each database by role,
``shard list`` shows each shard's accounts, messages, bytes and health."""

from __future__ import annotations

import json
import mailbox
import random
import socket
import subprocess
import sys
from pathlib import Path

from tests.integration.test_mailctl import ok


def _dead_pg_url() -> str:
    """A PostgreSQL URL on a loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"postgresql+asyncpg://postgres@127.0.0.1:{probe.getsockname()[1]}/mail"


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shardmail.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n{text}')
    return path


def _roles_config(tmp_path: Path, more: str) -> Path:
    """A directory and a shard "default" in SQLite files of their own, then ``more``."""
    return _config(
        tmp_path,
        f"""
[storage]
url = "sqlite+aiosqlite:///{tmp_path / "directory.db"}"
[storage.shards.default]
url = "sqlite+aiosqlite:///{tmp_path / "default.db"}"
{more}""",
    )


def mailctl(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailctl", "-c", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_config_reports_each_database_by_role(tmp_path: Path) -> None:
    config = _roles_config(tmp_path, f'[storage.shards.far]\nurl = "{_dead_pg_url()}"\n')
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


def _mbox(path: Path, count: int) -> Path:
    """An mbox of ``count`` messages with random bodies of random lengths."""
    box = mailbox.mbox(path)
    for n in range(count):
        body = random.randbytes(random.randint(50, 4000)).hex()
        box.add(f"From: a@remote.test\nSubject: m{n}\n\n{body}\n")
    box.close()
    return path


def test_shard_list_shows_accounts_messages_bytes_and_health(tmp_path: Path) -> None:
    b_url = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    config = _roles_config(tmp_path, f'[storage.shards.b]\nurl = "{b_url}"\nweight = 2\n')
    ok(mailctl(config, "domain", "add", "example.org"))
    counts = {"default": random.randint(1, 3), "b": random.randint(1, 3)}
    messages = {"default": 0, "b": 0}
    for shard, n in counts.items():
        for i in range(n):
            address = f"u{i}.{shard}@example.org"
            ok(mailctl(config, "account", "add", address, "--shard", shard, stdin="pw\n"))
            imported = random.randint(1, 6)
            source = _mbox(tmp_path / f"{shard}{i}.mbox", imported)
            ok(mailctl(config, "import", "mbox", address, "--from", str(source), "-q"))
            messages[shard] += imported
    used = {"default": 0, "b": 0}
    for line in ok(mailctl(config, "account", "list")).splitlines():
        fields = dict(f.split("=", 1) for f in line.split("\t")[1:])
        used[fields["shard"]] += int(fields["used"])

    listing = json.loads(ok(mailctl(config, "shard", "list", "--json")))
    assert listing["directory"]["reachable"] is True
    shards = {s["name"]: s for s in listing["shards"]}
    assert list(shards) == ["default", "b"]
    for name in ("default", "b"):
        assert shards[name]["accounts"] == counts[name]
        assert shards[name]["messages"] == messages[name]
        assert shards[name]["bytes"] == used[name] > 0
        assert shards[name]["reachable"] is True and shards[name]["error"] is None
        assert shards[name]["latency_ms"] >= 0
    assert shards["b"]["weight"] == 2.0

    table = ok(mailctl(config, "shard", "list")).splitlines()
    assert table[0].split() == ["SHARD", "WEIGHT", "ACCOUNTS", "MESSAGES", "BYTES", "HEALTH"]
    row = dict((line.split()[0], line.split()) for line in table[1:])
    assert row["b"][1:5] == ["2", str(counts["b"]), str(messages["b"]), str(used["b"])]
    assert row["b"][5] == "ok"


def test_shard_list_names_an_unreachable_shard(tmp_path: Path) -> None:
    """A shard that is down is listed with its error (exit 1, for
    monitoring); the others and the directory are still reported."""
    directory = f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path / "directory.db"}"\n'
    ok(mailctl(_config(tmp_path, directory), "domain", "add", "example.org"))
    config = _config(tmp_path, f'{directory}[storage.shards.far]\nurl = "{_dead_pg_url()}"\n')
    result = mailctl(config, "shard", "list", "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    shards = {s["name"]: s for s in json.loads(result.stdout)["shards"]}
    assert shards["default"]["reachable"] is True and shards["default"]["accounts"] == 0
    assert shards["far"]["reachable"] is False
    assert "connect" in shards["far"]["error"].lower()
    assert shards["far"]["messages"] is None and shards["far"]["accounts"] == 0
    table = mailctl(config, "shard", "list")
    assert table.returncode == 1
    far = [line for line in table.stdout.splitlines() if line.startswith("far")]
    assert far and "unreachable" in far[0]
