"""Realtime push: a send to a local user reaches that user's open WebSocket
within a second, is in storage and visible over IMAP; the long-poll
fallback returns the same events; resuming with ``since`` has no gaps."""

from __future__ import annotations

import asyncio
import imaplib
import json
import ssl
import time
from typing import Any

import aiohttp

from storage.model import UidSet
from tests.integration.http.conftest import PASSWORD, Api, deliver, make_mail


async def _open_ws(api: Api, http: aiohttp.ClientSession, since: int | None = None,
                   header_auth: bool = False) -> tuple[aiohttp.ClientWebSocketResponse, int]:
    url = api.base.replace("http://", "ws://") + "/v1/events"
    if since is not None:
        url += f"?since={since}"
    ws = await http.ws_connect(url, headers=api.headers if header_auth else None)
    if not header_auth:
        await ws.send_json({"type": "auth", "token": api.token})
    ready = await ws.receive_json(timeout=5)
    assert ready["type"] == "ready"
    return ws, ready["last_event_id"]


async def _next_event(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float
                      ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        frame = await ws.receive_json(timeout=max(0.01, deadline - time.monotonic()))
        if frame["type"] == "event" and frame["event"]["kind"] == kind:
            return frame["event"]


def _imap_subjects(port: int, address: str, context: ssl.SSLContext) -> list[bytes]:
    with imaplib.IMAP4("127.0.0.1", port) as client:
        client.starttls(context)
        client.login(address, PASSWORD)
        client.select("INBOX", readonly=True)
        _, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return [part[1].strip() for part in data if isinstance(part, tuple)]


async def test_send_to_local_user_is_pushed_within_a_second(
    alice_api: Api, bob_api: Api, http: aiohttp.ClientSession, mailstore: Any, bob: Any,
    http_settings: Any, tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext,
) -> None:
    ws, _ = await _open_ws(bob_api, http)
    try:
        started = time.monotonic()
        status, result = await alice_api.request("POST", "/v1/messages", json={
            "to": "bob@example.test", "subject": "Ping", "text": "Are you there?"})
        assert status == 202
        event = await _next_event(ws, "new", timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert event["message"]["subject"] == "Ping"
        assert event["message"]["from"]["address"] == "alice@example.test"
        assert event["message"]["unread"] is True
    finally:
        await ws.close()
    # In storage...
    inbox = await mailstore.mail(bob).get_mailbox(bob.id, "INBOX")
    [stored] = await mailstore.mail(bob).fetch(bob.id, inbox.id, UidSet.all())
    assert stored.parsed.message_id == result["message_id"]
    # ...and over IMAP.
    from imapd.imap.server import start_imap

    servers = await start_imap(http_settings, mailstore, tls_context)
    try:
        port = servers[0].sockets[0].getsockname()[1]
        subjects = await asyncio.to_thread(_imap_subjects, port, bob.address, client_tls_context)
        assert subjects == [b"Subject: Ping"]
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_websocket_pushes_flags_and_expunge_and_long_poll_agrees(
    alice_api: Api, http: aiohttp.ClientSession, mailstore: Any, alice: Any
) -> None:
    ws, start_id = await _open_ws(alice_api, http, header_auth=True)
    pushed: list[dict[str, Any]] = []
    try:
        await deliver(mailstore, alice, make_mail("Event source"))
        pushed.append(await _next_event(ws, "new", timeout=2))
        mid = pushed[0]["message_id"]
        await alice_api.request("PATCH", f"/v1/messages/{mid}", json={"read": True})
        pushed.append(await _next_event(ws, "flags", timeout=2))
        assert "\\Seen" in pushed[1]["flags"]
        trash_move = await alice_api.request("DELETE", f"/v1/messages/{mid}")
        assert trash_move[0] == 200
        pushed.append(await _next_event(ws, "expunge", timeout=2))
        assert pushed[2]["message_id"] == mid
    finally:
        await ws.close()
    # The long-poll from the same starting point sees the same events, in order.
    polled: list[dict[str, Any]] = []
    since = start_id
    while True:
        status, page = await alice_api.get(f"/v1/events/poll?since={since}&timeout=0")
        assert status == 200
        if not page["events"]:
            break
        polled.extend(page["events"])
        since = page["last_event_id"]
    polled_ids = [e["id"] for e in polled]
    assert polled_ids == sorted(polled_ids)
    for event in pushed:
        assert event["id"] in polled_ids
        twin = polled[polled_ids.index(event["id"])]
        assert (twin["kind"], twin["message_id"]) == (event["kind"], event["message_id"])


async def test_long_poll_waits_for_new_mail(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    status, first = await alice_api.get("/v1/events/poll")
    assert status == 200 and first["events"] == []
    since = first["last_event_id"]

    async def later() -> None:
        await asyncio.sleep(0.3)
        await deliver(mailstore, alice, make_mail("Worth the wait"))

    task = asyncio.create_task(later())
    started = time.monotonic()
    status, page = await alice_api.get(f"/v1/events/poll?since={since}&timeout=10")
    await task
    assert status == 200
    assert 0.25 < time.monotonic() - started < 5
    assert [e["kind"] for e in page["events"]] == ["new"]
    assert page["events"][0]["message"]["subject"] == "Worth the wait"
    assert page["last_event_id"] == page["events"][0]["id"]
    status, empty = await alice_api.get(f"/v1/events/poll?since={page['last_event_id']}"
                                        "&timeout=0.2")
    assert status == 200 and empty["events"] == []


async def test_websocket_resume_with_since_has_no_gaps(
    alice_api: Api, http: aiohttp.ClientSession, mailstore: Any, alice: Any
) -> None:
    ws, last = await _open_ws(alice_api, http)
    await deliver(mailstore, alice, make_mail("before disconnect"))
    seen = await _next_event(ws, "new", timeout=2)
    await ws.close()
    # Mail arrives while the client is away.
    for i in range(3):
        await deliver(mailstore, alice, make_mail(f"while away {i}"))
    ws, _ = await _open_ws(alice_api, http, since=seen["id"])
    try:
        subjects = [(await _next_event(ws, "new", timeout=2))["message"]["subject"]
                    for _ in range(3)]
        assert subjects == ["while away 0", "while away 1", "while away 2"]
    finally:
        await ws.close()
    assert last < seen["id"]


async def test_websocket_without_credentials_is_closed(
    alice_api: Api, http: aiohttp.ClientSession
) -> None:
    url = alice_api.base.replace("http://", "ws://") + "/v1/events"
    ws = await http.ws_connect(url)
    await ws.send_json({"type": "auth", "token": "sm1.bad.token"})
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401
    await ws.close()
    async with http.get(alice_api.base + "/v1/events", headers=alice_api.headers) as resp:
        assert resp.status == 426  # not a WebSocket upgrade
        assert json.loads(await resp.text())["error"]["code"] == "upgrade_required"
