"""The README's "## HTTP API" section: its commands work as written (run
with bash and curl against a running httpapi, only the port changed) and
its route table names every route the router serves."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from httpapi.service import HttpService

README = Path(__file__).resolve().parents[3] / "README.md"
DOCUMENTED_URL = "http://127.0.0.1:8080"


def section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## HTTP API\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


@pytest.fixture
async def first_steps(mailstore: Any) -> None:
    """The accounts the README's "First steps" creates."""
    await mailstore.directory.add_domain("example.org")
    await mailstore.directory.add_account("alice@example.org", "alice's password")
    await mailstore.directory.add_account("bob@example.org", "s3cret")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_commands_work_as_written(service: HttpService, first_steps: None) -> None:
    blocks = re.findall(r"```sh\n(.*?)```", section(), re.S)
    assert len(blocks) >= 3
    url = f"http://127.0.0.1:{service.ports[0]}"
    script = "set -euo pipefail\n" + "".join(blocks).replace(DOCUMENTED_URL, url)
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    # Each curl prints one JSON document; they follow each other on stdout.
    decoder, text, docs, pos = json.JSONDecoder(), out.decode(), [], 0
    while pos < len(text):
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    folders, sent, me, openapi = docs
    assert "INBOX" in [f["name"] for f in folders["folders"]]
    assert sent["delivered"] == ["alice@example.org"]
    assert me["address"] == "bob@example.org"
    assert openapi["openapi"].startswith("3.")


def test_the_route_table_names_every_route(service: HttpService) -> None:
    documented = set(re.findall(r"`((?:GET|POST|PUT|PATCH|DELETE) /[^` ?]*)", section()))
    served = {
        f"{route.method} {route.resource.canonical}"
        for route in service.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
        and route.resource.canonical.startswith(("/v1/", "/healthz"))
    }
    assert served - documented == set()
    assert documented - served == set()
