"""The systemd units start the console scripts, hardened as the issue asks."""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from conf.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "systemd").glob("*.service"))
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/shardmail",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "User": "shardmail",
}


def _read(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_one_unit_and_one_template_per_daemon() -> None:
    names = {p.name for p in UNITS}
    for daemon in ("mtad", "imapd", "httpapi"):
        assert f"shardmail-{daemon}.service" in names
        assert f"shardmail-{daemon}@.service" in names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_is_hardened_and_runs_a_console_script(unit: Path) -> None:
    service = _read(unit)["Service"]
    for key, value in HARDENING.items():
        assert service[key] == value, key
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    program = service["ExecStart"].split()[0].rsplit("/", 1)[1]
    assert program in scripts


def test_sysusers_and_tmpfiles_create_the_user_and_data_dir() -> None:
    assert "u shardmail" in (ROOT / "systemd" / "shardmail.sysusers").read_text()
    tmpfiles = (ROOT / "systemd" / "shardmail.tmpfiles").read_text()
    assert "/var/lib/shardmail 0750 shardmail" in tmpfiles


def test_sysctl_snippet_deepens_the_event_socket_queues() -> None:
    text = (ROOT / "systemd" / "shardmail.sysctl").read_text()
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    settings = {key.strip(): value.strip() for key, value in pairs}
    assert int(settings["net.unix.max_dgram_qlen"]) >= 512


def _exec_overrides(unit: Path) -> list[str]:
    """The ``-o`` values of a unit's ExecStart, split as systemd splits them."""
    words = shlex.split(_read(unit)["Service"]["ExecStart"].replace("$SHARDMAIL_OPTS", ""))
    return [words[i + 1] for i, word in enumerate(words) if word == "-o"]


def test_each_daemon_unit_serves_metrics_on_its_own_loopback_port() -> None:
    ports = {}
    for unit in UNITS:
        settings = load_settings(None, _exec_overrides(unit))  # every -o is a valid setting
        if "@" in unit.name:  # instances share ports: each names its own metrics port
            assert settings.server.share_ports and settings.server.metrics_listen == []
            continue
        assert not settings.server.share_ports
        (address,) = settings.server.metrics_listen
        assert address.startswith("127.0.0.1:")
        ports[unit.name] = address
    assert len(set(ports.values())) == len(ports) == 3


def _readme_block(heading: str) -> str:
    """The first ```sh block under a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    return section[section.index("```sh\n") + 6 : section.index("\n```", section.index("```sh"))]


def test_units_start_the_commands_the_readme_installs() -> None:
    """The README's one-line install makes a venv and links its commands
    into /usr/local/bin (so the first steps' `mailctl ...` is found); the
    units run that same venv's commands."""
    run_it = _readme_block("## Run it")
    venv = re.search(r"python3 -m venv (\S+)", run_it)
    assert venv, run_it
    bin_dir = f"{venv.group(1)}/bin"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    link = re.search(r"ln -sf ((?:\S+ )+)/usr/local/bin/", run_it)
    assert link, run_it
    assert sorted(link.group(1).split()) == sorted(f"{bin_dir}/{name}" for name in scripts)
    assert run_it.rstrip().endswith("&& mailctl serve")  # found on the PATH just linked
    for unit in UNITS:
        service = _read(unit)["Service"]
        for key in ("ExecStartPre", "ExecStart"):
            program = service[key].split()[0]
            assert program.rsplit("/", 1)[0] == bin_dir, (unit.name, key, program)
            assert program.rsplit("/", 1)[1] in scripts


def test_the_systemd_install_puts_each_snippet_where_it_says() -> None:
    install = _readme_block("### Install for systemd")
    for snippet in ("shardmail.sysusers", "shardmail.tmpfiles", "shardmail.sysctl"):
        first_line = (ROOT / "systemd" / snippet).read_text().splitlines()[0]
        target = first_line.removeprefix("# Install as ").strip()
        assert f"install -m 0644 systemd/{snippet} {target}" in install
    assert "/etc/shardmail/shardmail.toml" in install
    assert "systemctl enable --now shardmail.target" in install
