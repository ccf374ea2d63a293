"""Hostile request bodies: every route reads under its own size limit and
answers 413 early, JSON nesting and non-text strings are 400, and a
malformed HTTP request costs one log line, not a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from httpapi.service import HttpService, start
from tests.conftest import make_settings
from tests.integration.http.conftest import Api, login

HUGE = 35 * 1024 * 1024  # the report: a 35 MB login body


async def raw_request(port: int, head: bytes, body_chunks: list[bytes]) -> tuple[int, bytes]:
    """Writes the head and the chunks, then reads the reply; the server must
    answer without waiting for anything more (the declared rest never comes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for chunk in body_chunks:
            writer.write(chunk)
            await writer.drain()
        reply = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    status = int(reply.split(b" ", 2)[1])
    return status, reply.partition(b"\r\n\r\n")[2]


def post_head(path: str, length_header: bytes, token: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\n").encode() + auth + length_header + b"\r\n"


@pytest.mark.parametrize("path", ["/v1/login", "/v1/folders"])
async def test_a_huge_declared_body_is_413_before_it_is_sent(
    service: HttpService, alice_api: Api, path: str
) -> None:
    head = post_head(path, f"Content-Length: {HUGE}\r\n".encode(), alice_api.token)
    status, body = await raw_request(service.ports[0], head, [b'{"address": "'])
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("path", ["/v1/login", "/v1/folders"])
async def test_a_chunked_body_is_cut_off_at_the_route_limit(
    service: HttpService, alice_api: Api, path: str
) -> None:
    # No length declared: the server must stop reading after the limit
    # (well under 1 MiB here) instead of waiting for the 35 MB.
    filler = b" " * 65536
    chunk = f"{len(filler):x}\r\n".encode() + filler + b"\r\n"
    head = post_head(path, b"Transfer-Encoding: chunked\r\n", alice_api.token)
    status, body = await raw_request(service.ports[0], head, [chunk] * 16)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"


@pytest.fixture
async def small_api(tmp_path: Any, mailstore: Any, alice: Any, http: aiohttp.ClientSession
                    ) -> AsyncIterator[tuple[Api, int]]:
    settings = make_settings(tmp_path / "small", http={"max_message_size": 100_000})
    svc = await start(settings, mailstore, None)
    try:
        yield await login(f"http://127.0.0.1:{svc.ports[0]}", http, alice), svc.ports[0]
    finally:
        await svc.close()


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; boundary=b"])
async def test_a_chunked_send_is_cut_off_at_the_message_limit(
    small_api: tuple[Api, int], content_type: str
) -> None:
    api, port = small_api
    filler = b"x" * 65536
    chunk = f"{len(filler):x}\r\n".encode() + filler + b"\r\n"
    head = post_head("/v1/messages", b"Transfer-Encoding: chunked\r\n", api.token)
    head = head.replace(b"application/json", content_type.encode())
    start_part = b"--b\r\nContent-Disposition: form-data; name=text\r\n\r\n"
    first = f"{len(start_part):x}\r\n".encode() + start_part + b"\r\n"
    status, _ = await raw_request(port, head, [first] + [chunk] * 16)
    assert status == 413


def nested(depth: int) -> bytes:
    return b'{"address": ' + b"[" * depth + b"]" * depth + b', "password": "x"}'


@pytest.mark.parametrize("depth", [8, 50, 5000])
async def test_deeply_nested_json_is_400(alice_api: Api, depth: int) -> None:
    for path in ("/v1/login", "/v1/folders"):
        status, data = await alice_api.request(
            "POST", path, data=nested(depth), headers={"Content-Type": "application/json"}
        )
        assert (status, data["error"]["code"]) == (400, "invalid_json"), path


@pytest.mark.parametrize("name", ["\\ud800", "a\\udfffb", "x/\\udbff"])
async def test_folder_name_with_a_lone_surrogate_is_400(alice_api: Api, name: str) -> None:
    _, before = await alice_api.get("/v1/folders")
    body = b'{"name": "' + name.encode() + b'"}'
    status, data = await alice_api.request(
        "POST", "/v1/folders", data=body, headers={"Content-Type": "application/json"}
    )
    assert status == 400, data
    status, after = await alice_api.get("/v1/folders")
    assert status == 200
    assert after == before


async def test_folder_names_of_random_unicode_are_created_or_refused_never_500(
    alice_api: Api
) -> None:
    rng = random.Random()
    for _ in range(60):
        name = "".join(chr(rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x110000)]))
                       for _ in range(rng.randrange(1, 12)))
        body = json.dumps({"name": name}).encode()  # ensure_ascii: surrogates as escapes
        status, data = await alice_api.request(
            "POST", "/v1/folders", data=body, headers={"Content-Type": "application/json"}
        )
        assert status in (201, 400, 409), (name, data)


async def test_malformed_http_is_logged_as_one_line(
    service: HttpService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    head = b"GET /v1/folders HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"
    status, _ = await raw_request(service.ports[0], head, [])
    assert status == 400
    await asyncio.sleep(0.05)
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert records, "the bad request is logged"
    for record in records:
        assert record.exc_info is None and record.exc_text is None
        assert "\n" not in record.getMessage()


async def test_small_json_routes_still_work(alice_api: Api) -> None:
    status, folder = await alice_api.request("POST", "/v1/folders", json={"name": "Grüße"})
    assert status == 201
    assert folder["name"] == "Grüße"
