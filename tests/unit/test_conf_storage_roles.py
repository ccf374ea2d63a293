"""``[storage]`` roles (issue #19): the directory database, then shards as
tables with url, replicas and weight; the old ``shards = {name = "url"}``
form stays accepted, and every mistake names its key."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from conf.settings import ConfigError, load_settings

PG = "postgresql+asyncpg://mail@db1.example:5432/mail_a"


def _load(tmp_path: Path, text: str):
    path = tmp_path / "shardmail.toml"
    path.write_text(text)
    return load_settings(path, [f"server.data_dir={tmp_path}"])


def test_shard_tables_carry_url_replicas_and_weight(tmp_path: Path) -> None:
    replica = "postgresql+asyncpg://mail@db2.example:5432/mail_a"
    s = _load(
        tmp_path,
        f"""
        [storage]
        url = "postgresql+asyncpg://mail@dir.example/directory"
        [storage.shards.a]
        url = "{PG}"
        replicas = ["{replica}"]
        weight = 2.5
        [storage.shards.b]
        url = "postgresql+asyncpg://mail@db3.example/mail_b"
        weight = 0
        """,
    )
    a, b = s.storage.shards["a"], s.storage.shards["b"]
    assert (a.url, a.replicas, a.weight) == (PG, [replica], 2.5)
    assert (b.replicas, b.weight) == ([], 0.0)


def test_the_old_string_form_stays_accepted(tmp_path: Path) -> None:
    s = _load(tmp_path, f'[storage]\nshards = {{s2 = "{PG}"}}\n')
    assert s.storage.shards["s2"].url == PG
    assert s.storage.shards["s2"].weight == 1.0


def test_no_config_is_one_sqlite_file_with_no_extra_shard(tmp_path: Path) -> None:
    s = load_settings(overrides=[f"server.data_dir={tmp_path}"])
    assert s.storage.url == f"sqlite+aiosqlite:///{tmp_path / 'shardmail.db'}"
    assert s.storage.shards == {}


@pytest.mark.parametrize(
    ("table", "named"),
    [
        (f'url = "{PG}"\nweigth = 2', "storage.shards.a.weigth: unknown key"),
        (f'url = "{PG}"\nweight = -1', "storage.shards.a.weight:"),
        ("weight = 1", "storage.shards.a.url:"),
        ('url = "not a url"', "storage.shards.a.url:"),
        (f'url = "{PG}"\nreplicas = ["db2.example:5432"]', "storage.shards.a.replicas:"),
        # A replica is a streaming replica of PostgreSQL; SQLite has none.
        (
            'url = "sqlite+aiosqlite:////tmp/a.db"\nreplicas = ["sqlite+aiosqlite:////tmp/b.db"]',
            "storage.shards.a.replicas:",
        ),
    ],
)
def test_a_bad_shard_names_its_key(tmp_path: Path, table: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, f"[storage.shards.a]\n{table}\n")
    assert named in str(err.value)


def test_a_shard_name_must_fit_the_directory(tmp_path: Path) -> None:
    # accounts.shard is a String(64) of the directory; a space would break
    # `mailctl account add --shard` and the table output.
    long_name = "".join(random.choices(string.ascii_lowercase, k=random.randint(65, 90)))
    for name in (long_name, '"a b"', '""'):
        with pytest.raises(ConfigError) as err:
            _load(tmp_path, f'[storage.shards.{name}]\nurl = "{PG}"\n')
        assert "storage.shards" in str(err.value)


def test_shardmail_config_names_the_file_when_no_c_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SHARDMAIL_CONFIG names the configuration file in place of
    /etc/shardmail/shardmail.toml; -c still wins; a named file that does
    not exist is an error, not the defaults."""
    from conf.settings import CONFIG_ENV

    named = tmp_path / "site.toml"
    named.write_text(f'[storage.shards.east]\nurl = "{PG}"\nweight = 0\n')
    monkeypatch.setenv(CONFIG_ENV, str(named))
    assert set(load_settings(overrides=[f"server.data_dir={tmp_path}"]).storage.shards) == {"east"}
    other = tmp_path / "other.toml"
    other.write_text("")
    assert load_settings(other).storage.shards == {}
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match=r"absent\.toml: no such file"):
        load_settings()
