"""Configuration: typed settings, errors naming the key, overrides, example.toml."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from conf.settings import ConfigError, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "example.toml"


def test_defaults_serve_one_host() -> None:
    s = load_settings(overrides=["server.data_dir=/srv/mail"])
    assert s.storage.url == "sqlite+aiosqlite:////srv/mail/shardmail.db"
    assert s.storage.blob_dir == "/srv/mail/blobs"
    assert s.smtp.mx_listen == ["0.0.0.0:25"]
    assert s.imap.tls_listen == ["0.0.0.0:993"]
    assert s.pop3.listen == ["0.0.0.0:110"]
    assert s.auth.allow_plaintext is False


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("smtp.max_recipent=5", "smtp.max_recipent: unknown key"),
        ("nosuchsection.key=1", "nosuchsection: unknown key"),
        ("server.max_message_size='big'", "server.max_message_size:"),
        ("imap.listen=['localhost']", "imap.listen:"),
        ("pop3.idle_timeout_seconds=60", "pop3.idle_timeout_seconds:"),
        ("server.log_level='LOUD'", "server.log_level:"),
        ("tls.min_version='SSLv3'", "tls.min_version:"),
        ("server.event_loop='trio'", "server.event_loop:"),
        # A zero window or a negative limit would make every rate limit meaningless.
        ("smtp.rate_window_seconds=0", "smtp.rate_window_seconds:"),
        ("smtp.rate_limit_per_ip=-1", "smtp.rate_limit_per_ip:"),
        ("http.rate_limit_per_user=-5", "http.rate_limit_per_user:"),
        ("redis.url='http://cache:6379'", "redis.url:"),
        ("storage.events='kafka'", "storage.events:"),
    ],
)
def test_bad_key_or_value_is_an_error_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides=[override])
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("choice", "loop_module"), [("uvloop", "uvloop"), ("asyncio", "asyncio"), ("auto", "uvloop")]
)
def test_event_loop_setting_picks_the_loop(choice: str, loop_module: str) -> None:
    from runtime.daemon import run_loop

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    settings = load_settings(overrides=[f"server.event_loop={choice}"])
    assert run_loop(settings, which()) == loop_module


def test_overrides_are_toml_values_or_strings() -> None:
    s = load_settings(
        overrides=[
            "smtp.max_recipients=7",
            "auth.allow_plaintext=true",
            "imap.listen=['127.0.0.1:1143', '[::1]:1143']",
            "server.hostname=mx.example.org",  # not TOML: taken as a string
        ]
    )
    assert s.smtp.max_recipients == 7
    assert s.auth.allow_plaintext is True
    assert s.imap.listen == ["127.0.0.1:1143", "[::1]:1143"]
    assert s.server.hostname == "mx.example.org"


def test_file_then_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text('[server]\nhostname = "a.example"\n[smtp]\nmax_recipients = 3\n')
    s = load_settings(cfg, ["smtp.max_recipients=4"])
    assert (s.server.hostname, s.smtp.max_recipients) == ("a.example", 4)


def test_broken_toml_and_missing_file_are_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[server\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "absent.toml")


def _schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _schema_keys(ann, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def _toml_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in data.items():
        if isinstance(value, dict) and prefix == "":
            keys |= _toml_keys(value, f"{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_example_toml_shows_every_key_and_validates() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert _toml_keys(data) == _schema_keys(Settings)
    assert load_settings(EXAMPLE).smtp.max_recipients == 100


def test_check_config_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "mailctl", "check-config", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mailctl", "check-config", "-o", "smtp.max_errorz=1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "smtp.max_errorz: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr
