"""The package layering of DESIGN.md: no daemon imports another, and what
they share (``runtime``, ``delivery``, ``storage``, ``conf``) imports none of
them; ``mailctl`` stands above everything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = {"mtad", "imapd", "httpapi"}
FLOOR = {"conf", "storage", "runtime", "delivery"}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level package names imported anywhere in ``package``, by file."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_no_daemon_imports_another_or_mailctl(daemon: str) -> None:
    forbidden = (DAEMONS - {daemon}) | {"mailctl"}
    offenders = {f: n & forbidden for f, n in imported_packages(daemon).items() if n & forbidden}
    assert offenders == {}


@pytest.mark.parametrize("package", sorted(FLOOR))
def test_the_floor_imports_no_daemon(package: str) -> None:
    forbidden = DAEMONS | {"mailctl"}
    offenders = {f: n & forbidden for f, n in imported_packages(package).items() if n & forbidden}
    assert offenders == {}
