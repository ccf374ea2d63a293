"""The access log: one INFO line per request on ``httpapi.access`` with the
client address, method, path (query secrets masked), status, octets sent and
duration."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets

import aiohttp
import pytest

from httpapi.service import HttpService
from tests.integration.http.conftest import Api

LINE = re.compile(
    r'^(?P<remote>\S+) "(?P<method>[A-Z]+) (?P<target>\S+)" (?P<status>\d{3}) '
    r"(?P<size>\d+) (?P<ms>\d+\.\d)ms$"
)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    records = [r for r in caplog.records if r.name == "httpapi.access"]
    assert all(r.levelno == logging.INFO for r in records)
    matches = [LINE.match(r.getMessage()) for r in records]
    assert all(matches), [r.getMessage() for r in records]
    return matches  # type: ignore[return-value]


async def wait_for_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[re.Match[str]]:
    for _ in range(100):  # the line is written once the response is sent
        if len(access_lines(caplog)) >= count:
            break
        await asyncio.sleep(0.01)
    return access_lines(caplog)


async def raw_get(api: Api, path: str) -> bytes:
    """Every octet of the answer to one request on its own connection."""
    port = int(api.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 f"{next(f'{k}: {v}' for k, v in api.headers.items())}\r\n\r\n".encode())
    reply = await reader.read()
    writer.close()
    return reply


async def test_one_line_per_request_with_status_size_and_time(
    alice_api: Api, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="httpapi.access")
    caplog.clear()
    reply = await raw_get(alice_api, "/v1/folders")
    assert reply.startswith(b"HTTP/1.1 200 ")
    secret = secrets.token_urlsafe(16)
    async with http.get(alice_api.base + f"/v1/search?q=report&token={secret}&limit=5",
                        headers=alice_api.headers) as resp:
        await resp.read()
    async with http.post(alice_api.base + "/v1/login",
                         json={"address": "alice@example.test", "password": secret}) as resp:
        assert resp.status == 401
    first, search, login = await wait_for_lines(caplog, 3)
    assert (first["remote"], first["method"], first["target"]) == (
        "127.0.0.1", "GET", "/v1/folders")
    assert (first["status"], int(first["size"])) == ("200", len(reply))  # octets sent
    assert float(first["ms"]) >= 0
    assert search["target"] == "/v1/search?q=report&token=***&limit=5"
    assert (login["method"], login["target"], login["status"]) == ("POST", "/v1/login", "401")
    assert all(secret not in r.getMessage() for r in caplog.records)


async def test_a_malformed_request_gets_its_line(
    service: HttpService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="httpapi.access")
    caplog.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", service.ports[0])
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    await reader.read(65536)
    writer.close()
    [line] = await wait_for_lines(caplog, 1)
    assert line["status"] == "400"
