"""The REST API over real sockets: every route, authorization, validation,
pagination under concurrent delivery, filtering, search, threads, folders."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from typing import Any

import aiohttp
import pytest

from httpapi.service import start
from runtime.metrics import REGISTRY
from storage.model import SEEN, UidSet
from tests.conftest import make_settings
from tests.integration.http.conftest import PASSWORD, Api, deliver, login, make_mail

# ---- authentication -------------------------------------------------------


async def test_login_issues_a_token_that_authenticates(alice_api: Api) -> None:
    status, me = await alice_api.get("/v1/me")
    assert status == 200
    assert me["address"] == "alice@example.test"


async def test_login_with_wrong_password_is_401_and_slowed(
    base_url: str, http: aiohttp.ClientSession, alice: Any
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(3):
        async with http.post(base_url + "/v1/login",
                             json={"address": alice.address, "password": "wrong"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "auth_failed"
    # tests.conftest sets a 0.05 s delay after the first failure, doubling (storage.throttle):
    # the second attempt waits 0.05 s, the third 0.1 s.
    assert loop.time() - started >= 0.14


async def test_unauthenticated_requests_get_401_with_challenge(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(base_url + "/v1/folders") as resp:
        assert resp.status == 401
        assert "Bearer" in resp.headers["WWW-Authenticate"]
        assert (await resp.json())["error"]["code"] == "unauthorized"
    async with http.get(base_url + "/v1/folders",
                        headers={"Authorization": "Bearer sm1.forged.token"}) as resp:
        assert resp.status == 401


async def test_basic_auth_with_account_password(
    base_url: str, http: aiohttp.ClientSession, alice: Any
) -> None:
    async with http.get(base_url + "/v1/folders", headers=_basic(alice.address, PASSWORD)
                        ) as resp:
        assert resp.status == 200
        names = [f["name"] for f in (await resp.json())["folders"]]
    assert names[:4] == ["INBOX", "Sent", "Drafts", "Trash"]
    async with http.get(base_url + "/v1/folders", headers=_basic(alice.address, "nope")
                        ) as resp:
        assert resp.status == 401


def _basic(login: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{login}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_token_stops_working_after_password_change(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    assert (await alice_api.get("/v1/me"))[0] == 200
    await mailstore.directory.set_password(alice.address, "a new password entirely")
    assert (await alice_api.get("/v1/me"))[0] == 401


async def test_two_instances_share_the_token_key(
    http_settings: Any, mailstore: Any, alice_api: Api, http: aiohttp.ClientSession
) -> None:
    second = await start(http_settings, mailstore, None)
    try:
        url = f"http://127.0.0.1:{second.ports[0]}/v1/me"
        async with http.get(url, headers=alice_api.headers) as resp:
            assert resp.status == 200
    finally:
        await second.close()


async def test_rate_limit_answers_429_with_retry_after(
    tmp_path: Any, mailstore: Any, alice: Any, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path / "rl", http={"rate_limit_per_user": 3,
                                                    "rate_limit_per_ip": 1000})
    svc = await start(settings, mailstore, None)
    try:
        base = f"http://127.0.0.1:{svc.ports[0]}"
        api = await login(base, http, alice)
        statuses = [(await api.get("/v1/me"))[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        async with http.get(base + "/v1/me", headers=api.headers) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"]["code"] == "rate_limited"
    finally:
        await svc.close()


async def test_per_ip_rate_limit(tmp_path: Any, mailstore: Any, http: aiohttp.ClientSession
                                 ) -> None:
    settings = make_settings(tmp_path / "rl", http={"rate_limit_per_ip": 2})
    svc = await start(settings, mailstore, None)
    try:
        base = f"http://127.0.0.1:{svc.ports[0]}"
        codes = []
        for _ in range(3):
            async with http.get(base + "/v1/folders") as resp:
                codes.append(resp.status)
        assert codes == [401, 401, 429]
    finally:
        await svc.close()


# ---- authorization: another user's objects are 404 ------------------------


async def test_another_users_message_and_folder_are_404(
    alice_api: Api, bob_api: Api, mailstore: Any, alice: Any
) -> None:
    await deliver(mailstore, alice, make_mail("For Alice only",
                                              attachment=("a.txt", "text/plain", b"secret")))
    inbox = await _inbox(alice_api)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    message_id = page["messages"][0]["id"]
    for method, path, body in [
        ("GET", f"/v1/messages/{message_id}", None),
        ("GET", f"/v1/messages/{message_id}/raw", None),
        ("GET", f"/v1/messages/{message_id}/attachments/0", None),
        ("PATCH", f"/v1/messages/{message_id}", {"read": True}),
        ("DELETE", f"/v1/messages/{message_id}", None),
        ("GET", f"/v1/folders/{inbox}/messages", None),
        ("PATCH", f"/v1/folders/{inbox}", {"name": "Stolen"}),
        ("DELETE", f"/v1/folders/{inbox}", None),
    ]:
        status, data = await bob_api.request(method, path, json=body)
        assert status == 404, (method, path, data)
        assert data["error"]["code"] == "not_found"
    # Bob cannot move his own message into Alice's folder either.
    await deliver(mailstore, await mailstore.directory.get_account("bob@example.test"),
                  make_mail("Bob's"))
    bob_inbox = await _inbox(bob_api)
    _, bob_page = await bob_api.get(f"/v1/folders/{bob_inbox}/messages")
    status, _ = await bob_api.request("PATCH", f"/v1/messages/{bob_page['messages'][0]['id']}",
                                      json={"folder_id": inbox})
    assert status == 404
    # Alice's message is untouched.
    _, still = await alice_api.get(f"/v1/messages/{message_id}")
    assert still["unread"] is True and still["subject"] == "For Alice only"


async def test_garbage_ids_are_404(alice_api: Api) -> None:
    for path in ["/v1/messages/!!!", "/v1/messages/bTo5OTkuMQ", "/v1/folders/999/messages",
                 "/v1/folders/abc/messages", "/v1/threads/nope"]:
        status, data = await alice_api.get(path)
        assert status == 404, path
        assert data["error"]["code"] == "not_found"


# ---- folders and message lists --------------------------------------------


async def _inbox(api: Api) -> str:
    _, data = await api.get("/v1/folders")
    return next(f["id"] for f in data["folders"] if f["name"] == "INBOX")


async def _folder(api: Api, name: str) -> dict[str, Any]:
    _, data = await api.get("/v1/folders")
    return next(f for f in data["folders"] if f["name"] == name)


async def test_folder_counts(alice_api: Api, mailstore: Any, alice: Any) -> None:
    await deliver(mailstore, alice, make_mail("one"))
    await deliver(mailstore, alice, make_mail("two"), flags=(SEEN,))
    inbox = await _folder(alice_api, "INBOX")
    assert (inbox["total"], inbox["unread"], inbox["special_use"]) == (2, 1, None)
    assert (await _folder(alice_api, "Trash"))["special_use"] == "\\Trash"


async def test_pagination_neither_skips_nor_repeats_under_concurrent_inserts(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    for i in range(23):
        await deliver(mailstore, alice, make_mail(f"old {i:02d}"))
    inbox = await _inbox(alice_api)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = f"?limit=5&cursor={cursor}" if cursor else "?limit=5"
        status, page = await alice_api.get(f"/v1/folders/{inbox}/messages{query}")
        assert status == 200
        seen.extend(m["subject"] for m in page["messages"])
        pages += 1
        # New mail lands between page requests, and concurrently with the next one.
        await deliver(mailstore, alice, make_mail(f"new {pages}"))
        cursor = page["next_cursor"]
        if cursor is None:
            break
        concurrent = asyncio.create_task(deliver(mailstore, alice, make_mail(f"racing {pages}")))
        await asyncio.sleep(0)
        await concurrent
    assert seen == [f"old {i:02d}" for i in reversed(range(23))]
    assert pages == 5


async def test_unread_and_flagged_filters(alice_api: Api, mailstore: Any, alice: Any) -> None:
    for i in range(6):
        await deliver(mailstore, alice, make_mail(f"m{i}"), flags=(SEEN,) if i % 2 else ())
    inbox = await _inbox(alice_api)
    _, unread = await alice_api.get(f"/v1/folders/{inbox}/messages?unread=true")
    assert [m["subject"] for m in unread["messages"]] == ["m4", "m2", "m0"]
    assert all(m["unread"] for m in unread["messages"])
    _, read = await alice_api.get(f"/v1/folders/{inbox}/messages?unread=false&limit=2")
    assert [m["subject"] for m in read["messages"]] == ["m5", "m3"]
    _, rest = await alice_api.get(
        f"/v1/folders/{inbox}/messages?unread=false&limit=2&cursor={read['next_cursor']}")
    assert [m["subject"] for m in rest["messages"]] == ["m1"]
    assert rest["next_cursor"] is None
    await alice_api.request("PATCH", f"/v1/messages/{unread['messages'][1]['id']}",
                            json={"flagged": True})
    _, flagged = await alice_api.get(f"/v1/folders/{inbox}/messages?flagged=true")
    assert [m["subject"] for m in flagged["messages"]] == ["m2"]
    _, by_sender = await alice_api.get(f"/v1/folders/{inbox}/messages?from=carol@remote")
    assert len(by_sender["messages"]) == 6


async def test_list_item_fields(alice_api: Api, mailstore: Any, alice: Any) -> None:
    await deliver(mailstore, alice, make_mail(
        "Report", body="Please see the attached figures for the quarter.",
        attachment=("q3.csv", "text/csv", b"a,b\n1,2\n")))
    _, page = await alice_api.get(f"/v1/folders/{await _inbox(alice_api)}/messages")
    item = page["messages"][0]
    assert item["from"] == {"name": "Carol Sender", "address": "carol@remote.test"}
    assert item["to"] == [{"name": None, "address": "alice@example.test"}]
    assert item["preview"].startswith("Please see the attached figures")
    assert item["has_attachments"] is True
    assert item["unread"] is True and item["flags"] == []
    assert item["thread_id"] and item["date"].endswith("Z")


async def test_list_validation_errors(alice_api: Api) -> None:
    inbox = await _inbox(alice_api)
    for query, code in [("limit=0", "invalid_limit"), ("limit=abc", "invalid_limit"),
                        ("unread=maybe", "invalid_filter"), ("since=yesterday", "invalid_filter"),
                        ("cursor=zzz", "invalid_cursor")]:
        status, data = await alice_api.get(f"/v1/folders/{inbox}/messages?{query}")
        assert (status, data["error"]["code"]) == (400, code), query


async def test_folder_create_rename_delete(alice_api: Api, mailstore: Any, alice: Any) -> None:
    status, created = await alice_api.request("POST", "/v1/folders", json={"name": "Projects"})
    assert status == 201 and created["name"] == "Projects" and created["total"] == 0
    status, child = await alice_api.request(
        "POST", "/v1/folders", json={"name": "Alpha", "parent_id": created["id"]})
    assert status == 201 and child["name"] == "Projects/Alpha"
    status, data = await alice_api.request("POST", "/v1/folders", json={"name": "Projects"})
    assert (status, data["error"]["code"]) == (409, "exists")
    for bad in ["", "a//b", "x*", "/lead", 42]:
        status, data = await alice_api.request("POST", "/v1/folders", json={"name": bad})
        assert (status, data["error"]["code"]) == (400, "invalid_name"), bad
    status, renamed = await alice_api.request(
        "PATCH", f"/v1/folders/{created['id']}", json={"name": "Work"})
    assert status == 200 and renamed["name"] == "Work" and renamed["id"] == created["id"]
    names = [b.name for b in await mailstore.mail(alice).list_mailboxes(alice.id)]
    assert "Work/Alpha" in names and "Projects" not in names
    status, _ = await alice_api.request("DELETE", f"/v1/folders/{child['id']}")
    assert status == 204
    inbox = await _inbox(alice_api)
    status, data = await alice_api.request("DELETE", f"/v1/folders/{inbox}")
    assert (status, data["error"]["code"]) == (400, "special_folder")


# ---- reading --------------------------------------------------------------


async def test_read_message_sanitized_html_attachments_and_raw(
    alice_api: Api, mailstore: Any, alice: Any, http: aiohttp.ClientSession
) -> None:
    pdf = b"%PDF-1.4 fake pdf " * 5000  # spans several blob reads when base64-encoded
    raw = make_mail(
        "Invoice", body="Plain version",
        html='<p onclick="steal()">Hi <a href="javascript:alert(1)">click</a>'
        '<img src="https://example.org/x.png"><script>alert(1)</script>'
        '<iframe src="https://evil.test"></iframe><style>p{}</style></p>',
        attachment=("invoice 2024.pdf", "application/pdf", pdf),
    )
    await deliver(mailstore, alice, raw)
    _, page = await alice_api.get(f"/v1/folders/{await _inbox(alice_api)}/messages")
    mid = page["messages"][0]["id"]
    status, message = await alice_api.get(f"/v1/messages/{mid}")
    assert status == 200
    assert message["text"].strip() == "Plain version"
    html = message["html"]
    for forbidden in ["script", "onclick", "javascript:", "iframe", "style", "alert"]:
        assert forbidden not in html.lower(), forbidden
    assert '<img src="https://example.org/x.png">' in html and "click</a>" in html
    assert ["Subject", "Invoice"] in message["headers"]
    [attachment] = message["attachments"]
    assert attachment["filename"] == "invoice 2024.pdf"
    assert attachment["content_type"] == "application/pdf"
    async with http.get(alice_api.base + attachment["url"], headers=alice_api.headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/pdf"
        assert resp.headers["Content-Disposition"].startswith('attachment; filename="invoice')
        assert "filename*=UTF-8''invoice%202024.pdf" in resp.headers["Content-Disposition"]
        assert await resp.read() == pdf
    async with http.get(f"{alice_api.base}/v1/messages/{mid}/raw",
                        headers=alice_api.headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "message/rfc822"
        assert await resp.read() == raw
    status, _ = await alice_api.get(f"/v1/messages/{mid}/attachments/1")
    assert status == 404


async def test_patch_read_flag_and_move(alice_api: Api, mailstore: Any, alice: Any) -> None:
    await deliver(mailstore, alice, make_mail("Move me"))
    inbox = await _inbox(alice_api)
    archive = await _folder(alice_api, "Archive")
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    mid = page["messages"][0]["id"]
    status, updated = await alice_api.request("PATCH", f"/v1/messages/{mid}",
                                              json={"read": True, "flagged": True})
    assert status == 200 and updated["unread"] is False and updated["flagged"] is True
    assert {"\\Seen", "\\Flagged"} <= set(updated["flags"])
    status, moved = await alice_api.request("PATCH", f"/v1/messages/{mid}",
                                            json={"folder_id": archive["id"], "read": False})
    assert status == 200 and moved["folder_id"] == archive["id"] and moved["unread"] is True
    assert (await alice_api.get(f"/v1/messages/{mid}"))[0] == 404
    assert (await _folder(alice_api, "Archive"))["total"] == 1
    for body, code in [({}, "empty_update"), ({"read": "yes"}, "invalid_field"),
                       ({"colour": "red"}, "unknown_field")]:
        status, data = await alice_api.request("PATCH", f"/v1/messages/{moved['id']}", json=body)
        assert (status, data["error"]["code"]) == (400, code)


async def test_patch_uses_unread_like_lists_and_filters(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    await deliver(mailstore, alice, make_mail("Name the read state once"))
    inbox = await _inbox(alice_api)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    mid = page["messages"][0]["id"]
    status, updated = await alice_api.request("PATCH", f"/v1/messages/{mid}",
                                              json={"unread": False})
    assert (status, updated["unread"]) == (200, False)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages?unread=true")
    assert page["messages"] == []
    status, updated = await alice_api.request("PATCH", f"/v1/messages/{mid}",
                                              json={"unread": True})
    assert (status, updated["unread"]) == (200, True)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages?unread=true")
    assert [m["id"] for m in page["messages"]] == [mid]
    # "read" stays accepted for older clients; contradicting "unread" is an error.
    status, updated = await alice_api.request("PATCH", f"/v1/messages/{mid}",
                                              json={"read": True})
    assert (status, updated["unread"]) == (200, False)
    for body, code in [({"unread": "no"}, "invalid_field"),
                       ({"unread": True, "read": True}, "conflicting_fields")]:
        status, data = await alice_api.request("PATCH", f"/v1/messages/{mid}", json=body)
        assert (status, data["error"]["code"]) == (400, code)


async def test_delete_moves_to_trash_then_expunges(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    await deliver(mailstore, alice, make_mail("Doomed"))
    inbox = await _inbox(alice_api)
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    status, first = await alice_api.request("DELETE", f"/v1/messages/{page['messages'][0]['id']}")
    assert status == 200 and first["expunged"] is False
    trash = await _folder(alice_api, "Trash")
    assert first["folder_id"] == trash["id"] and trash["total"] == 1
    status, second = await alice_api.request("DELETE", f"/v1/messages/{first['id']}")
    assert status == 200 and second["expunged"] is True
    assert (await _folder(alice_api, "Trash"))["total"] == 0
    assert (await alice_api.get(f"/v1/messages/{first['id']}"))[0] == 404


# ---- sending --------------------------------------------------------------


async def test_send_json_delivers_locally_strips_bcc_and_saves_sent(
    alice_api: Api, mailstore: Any, bob: Any
) -> None:
    attachment = base64.b64encode(b"col1,col2\n").decode()
    status, result = await alice_api.request("POST", "/v1/messages", json={
        "to": ["Bob <bob@example.test>"], "bcc": "alice@example.test",
        "subject": "Numbers ✓", "text": "See attached.", "html": "<p>See attached.</p>",
        "attachments": [{"filename": "n.csv", "content_type": "text/csv", "content": attachment}],
    })
    assert status == 202, result
    assert sorted(result["delivered"]) == ["alice@example.test", "bob@example.test"]
    assert result["sent_id"] and result["message_id"].endswith("@example.test>")
    bob_inbox = await mailstore.mail(bob).get_mailbox(bob.id, "INBOX")
    [stored] = await mailstore.mail(bob).fetch(bob.id, bob_inbox.id, UidSet.all())
    assert stored.parsed.subject == "Numbers ✓" and stored.parsed.has_attachments
    raw = await mailstore.blobs.get(stored.entry.blob_key)
    assert b"\nBcc:" not in raw and b"alice@example.test" in raw  # From, not Bcc
    assert stored.parsed.message_id == result["message_id"]
    status, sent = await alice_api.get(f"/v1/messages/{result['sent_id']}")
    assert status == 200 and sent["subject"] == "Numbers ✓" and sent["unread"] is False
    assert sent["attachments"][0]["filename"] == "n.csv"


async def test_send_multipart_with_attachment(alice_api: Api, mailstore: Any, bob: Any) -> None:
    form = aiohttp.FormData()
    form.add_field("to", "bob@example.test")
    form.add_field("subject", "Photo")
    form.add_field("text", "Here it is")
    form.add_field("attachment", b"\x89PNG fake", filename="cat.png", content_type="image/png")
    status, result = await alice_api.request("POST", "/v1/messages", data=form)
    assert status == 202, result
    bob_inbox = await mailstore.mail(bob).get_mailbox(bob.id, "INBOX")
    [stored] = await mailstore.mail(bob).fetch(bob.id, bob_inbox.id, UidSet.all())
    assert stored.parsed.subject == "Photo" and stored.parsed.has_attachments


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"subject": "no one"}, 400, "no_recipients"),
        ({"to": "not an address", "text": "x"}, 400, "invalid_address"),
        ({"to": "bob@example.test", "subject": "a\r\nBcc: eve@evil.test"}, 400, "invalid_field"),
        ({"to": "bob@example.test", "attachments": [{"content": "***"}]}, 400,
         "invalid_attachment"),
        ({"to": "bob@example.test", "sender": "ceo@example.test"}, 400, "unknown_field"),
        ({"to": "nobody@example.test", "text": "x"}, 404, "not_found"),
        ({"to": "bob@example.test", "text": "x" * 3000}, 413, "message_too_large"),
    ],
)
async def test_send_validation_errors(
    tmp_path: Any, mailstore: Any, alice: Any, bob: Any, http: aiohttp.ClientSession,
    body: dict[str, Any], status: int, code: str,
) -> None:
    settings = make_settings(tmp_path / "small", http={"max_message_size": 2000})
    svc = await start(settings, mailstore, None)
    try:
        api = await login(f"http://127.0.0.1:{svc.ports[0]}", http, alice)
        got, data = await api.request("POST", "/v1/messages", json=body)
        assert (got, data["error"]["code"]) == (status, code), data
        got, data = await api.request("POST", "/v1/messages", data=b"x",
                                      headers={"Content-Type": "text/plain"})
        assert (got, data["error"]["code"]) == (415, "unsupported_media_type")
        got, data = await api.request("POST", "/v1/messages", data=b"{not json",
                                      headers={"Content-Type": "application/json"})
        assert (got, data["error"]["code"]) == (400, "invalid_json")
    finally:
        await svc.close()
    bob_inbox = await mailstore.mail(bob).get_mailbox(bob.id, "INBOX")
    assert (await mailstore.mail(bob).status(bob.id, bob_inbox.id)).messages == 0


# ---- search and threads ---------------------------------------------------


async def _seed_search(mailstore: Any, alice: Any) -> None:
    await deliver(mailstore, alice, make_mail("Budget 2025", sender="Dana <dana@corp.test>",
                                              body="The budget for next year."))
    await deliver(mailstore, alice, make_mail("Lunch", sender="erin@food.test",
                                              body="Pizza or sushi? The budget is tight."))
    await deliver(mailstore, alice, make_mail("Slides", sender="dana@corp.test",
                                              body="Deck attached.",
                                              attachment=("deck.pdf", "application/pdf", b"%PDF")),
                  mailbox="Archive", flags=(SEEN,))


@pytest.mark.parametrize(
    ("query", "subjects"),
    [
        ("subject:budget", ["Budget 2025"]),
        ("from:dana", ["Slides", "Budget 2025"]),
        ("body:sushi", ["Lunch"]),
        ("budget", ["Lunch", "Budget 2025"]),
        ("has:attachment", ["Slides"]),
        ("is:unread from:dana", ["Budget 2025"]),
        ("to:alice@example.test -subject:lunch", ["Slides", "Budget 2025"]),
        ('subject:"budget 2025"', ["Budget 2025"]),
    ],
)
async def test_search(alice_api: Api, mailstore: Any, alice: Any, query: str,
                      subjects: list[str]) -> None:
    await _seed_search(mailstore, alice)
    status, result = await alice_api.get("/v1/search", params={"q": query})
    assert status == 200, result
    assert [m["subject"] for m in result["messages"]] == subjects


async def test_search_errors_and_pagination(alice_api: Api, mailstore: Any, alice: Any) -> None:
    status, data = await alice_api.get("/v1/search", params={"q": 'subject:"open'})
    assert (status, data["error"]["code"]) == (400, "invalid_query")
    status, data = await alice_api.get("/v1/search", params={"q": "is:sleepy"})
    assert (status, data["error"]["code"]) == (400, "invalid_query")
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for i in range(9):
        await deliver(mailstore, alice, make_mail(f"Status report {i}", date=base))
    collected: list[str] = []
    cursor = None
    while True:
        params = {"q": "subject:report", "limit": "4", **({"cursor": cursor} if cursor else {})}
        _, page = await alice_api.get("/v1/search", params=params)
        collected.extend(m["subject"] for m in page["messages"])
        await deliver(mailstore, alice, make_mail("Status report (late)"))
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert collected == [f"Status report {i}" for i in reversed(range(9))]


async def test_threads_group_a_conversation(alice_api: Api, mailstore: Any, alice: Any) -> None:
    await deliver(mailstore, alice, make_mail("Trip", message_id="<t1@remote.test>"))
    await deliver(mailstore, alice, make_mail("Re: Trip", message_id="<t2@remote.test>",
                                              in_reply_to="<t1@remote.test>",
                                              references="<t1@remote.test>"))
    await deliver(mailstore, alice, make_mail("Unrelated", message_id="<u1@remote.test>"))
    await deliver(mailstore, alice, make_mail("Re: Re: Trip", message_id="<t3@remote.test>",
                                              references="<t1@remote.test> <t2@remote.test>"),
                  mailbox="Archive")
    _, page = await alice_api.get(f"/v1/folders/{await _inbox(alice_api)}/messages")
    by_subject = {m["subject"]: m["thread_id"] for m in page["messages"]}
    assert by_subject["Trip"] == by_subject["Re: Trip"] != by_subject["Unrelated"]
    status, thread = await alice_api.get(f"/v1/threads/{by_subject['Trip']}")
    assert status == 200
    assert [m["subject"] for m in thread["messages"]] == ["Trip", "Re: Trip", "Re: Re: Trip"]
    assert thread["unread"] == 3


# ---- operations -----------------------------------------------------------


async def test_healthz_metrics_and_openapi(
    base_url: str, http: aiohttp.ClientSession, alice_api: Api
) -> None:
    async with http.get(base_url + "/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    await alice_api.get("/v1/folders")
    # Metrics are scraped on server.metrics_listen (runtime.scrape), not the public port.
    async with http.get(base_url + "/metrics") as resp:
        assert resp.status == 404
    text = REGISTRY.render()
    assert 'shardmail_http_requests_total{route="list_folders",status="200"}' in text
    assert "# TYPE shardmail_http_request_duration_seconds histogram" in text
    async with http.get(base_url + "/v1/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.") and "/v1/messages/{message_id}" in doc["paths"]
    async with http.get(base_url + "/") as resp:
        assert resp.status == 200 and "script-src 'self'" in resp.headers[
            "Content-Security-Policy"]
    async with http.get(base_url + "/v1/nothing-here", headers=alice_api.headers) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
