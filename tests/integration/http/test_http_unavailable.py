"""Storage unavailable: every route answers 503 with Retry-After (RFC 9110
sections 15.6.4 and 10.2.3), login included: an unreachable directory is
never a wrong password (401)."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest

from httpapi.service import HttpService
from storage.errors import ErrorKind, StorageError
from tests.integration.http.conftest import PASSWORD, Api, deliver, make_mail


class Down:
    """A storage part whose every call fails as an outage does."""

    def __getattr__(self, name: str) -> Any:
        async def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise StorageError(ErrorKind.TEMPORARY, "database is unreachable")

        return unavailable


def take_down(monkeypatch: pytest.MonkeyPatch, storage: Any) -> None:
    down = Down()
    monkeypatch.setattr(storage, "directory", down)
    monkeypatch.setattr(storage, "blobs", down)
    monkeypatch.setattr(storage, "mail", lambda account: down)


@pytest.fixture
async def ids(alice_api: Api, mailstore: Any, alice: Any) -> dict[str, str]:
    """Real ids of a folder, a message with an attachment and its thread."""
    await deliver(mailstore, alice, make_mail(attachment=("a.bin", "application/pdf", b"%PDF")))
    _, folders = await alice_api.get("/v1/folders")
    inbox = next(f["id"] for f in folders["folders"] if f["name"] == "INBOX")
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    item = page["messages"][0]
    return {"folder_id": inbox, "message_id": item["id"], "thread_id": item["thread_id"],
            "index": "0"}


# Every /v1 route with a request that passes validation, so storage is reached.
ROUTES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "login": ("POST", "/v1/login", {"address": "alice@example.test", "password": PASSWORD}),
    "whoami": ("GET", "/v1/me", None),
    "list_folders": ("GET", "/v1/folders", None),
    "create_folder": ("POST", "/v1/folders", {"name": "Projects"}),
    "rename_folder": ("PATCH", "/v1/folders/{folder_id}", {"name": "Renamed"}),
    "delete_folder": ("DELETE", "/v1/folders/{folder_id}", None),
    "list_messages": ("GET", "/v1/folders/{folder_id}/messages", None),
    "get_message": ("GET", "/v1/messages/{message_id}", None),
    "get_message_raw": ("GET", "/v1/messages/{message_id}/raw", None),
    "get_attachment": ("GET", "/v1/messages/{message_id}/attachments/{index}", None),
    "update_message": ("PATCH", "/v1/messages/{message_id}", {"flagged": True}),
    "delete_message": ("DELETE", "/v1/messages/{message_id}", None),
    "send_message": ("POST", "/v1/messages", {"to": "bob@example.test", "text": "hi"}),
    "search_messages": ("GET", "/v1/search?q=hello", None),
    "get_thread": ("GET", "/v1/threads/{thread_id}", None),
    "poll_events": ("GET", "/v1/events/poll?since=0&timeout=0", None),
    "events_websocket": ("GET", "/v1/events", None),
    "get_spam_settings": ("GET", "/v1/settings/spam", None),
    "put_spam_settings": ("PUT", "/v1/settings/spam", {"block": ["spam.example"]}),
}
PUBLIC_WITHOUT_STORAGE = {"openapi"}


def test_the_table_covers_every_route(service: HttpService) -> None:
    names = {r.name for r in service.app.router.routes()
             if r.resource is not None and r.resource.canonical.startswith("/v1/")}
    assert names - PUBLIC_WITHOUT_STORAGE == set(ROUTES)


def assert_unavailable(status: int, headers: Any, body: Any) -> None:
    assert status == 503, body
    assert int(headers["Retry-After"]) > 0
    assert body["error"]["code"] == "temporary"


@pytest.mark.parametrize("name", sorted(ROUTES))
async def test_every_route_is_503_with_retry_after(
    name: str, alice_api: Api, ids: dict[str, str], mailstore: Any,
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    method, path, body = ROUTES[name]
    take_down(monkeypatch, mailstore)
    async with http.request(method, alice_api.base + path.format(**ids), json=body,
                            headers=alice_api.headers) as resp:
        assert_unavailable(resp.status, resp.headers, await resp.json())


@pytest.mark.parametrize("scheme", ["login", "basic", "bearer"])
async def test_an_unreachable_directory_is_never_401(
    scheme: str, alice_api: Api, mailstore: Any, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    take_down(monkeypatch, mailstore)
    credentials = f"alice@example.test:{PASSWORD}".encode()
    if scheme == "login":
        request = http.post(alice_api.base + "/v1/login",
                            json={"address": "alice@example.test", "password": PASSWORD})
    elif scheme == "basic":
        auth = {"Authorization": "Basic " + base64.b64encode(credentials).decode()}
        request = http.get(alice_api.base + "/v1/folders", headers=auth)
    else:
        request = http.get(alice_api.base + "/v1/folders", headers=alice_api.headers)
    async with request as resp:
        assert_unavailable(resp.status, resp.headers, await resp.json())


async def test_healthz_is_503_with_retry_after(
    base_url: str, mailstore: Any, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    take_down(monkeypatch, mailstore)
    async with http.get(base_url + "/healthz") as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) > 0


async def test_websocket_login_during_an_outage_closes_try_again_later(
    alice_api: Api, mailstore: Any, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    take_down(monkeypatch, mailstore)
    async with http.ws_connect(alice_api.base + "/v1/events") as ws:
        await ws.send_json({"type": "auth", "token": alice_api.token})
        message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1013  # RFC 6455 section 7.4.1: try again later
