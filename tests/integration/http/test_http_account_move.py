"""The HTTP API on an account fenced for a move to another shard (issue
#19, ``storage/move.py``): a write is 503 Service Unavailable (RFC 9110
section 15.6.4), never a 404 or 500, and it lands nowhere."""

from __future__ import annotations

from typing import Any

from storage.move import AccountMove
from tests.integration.http.conftest import Api, deliver, make_mail


async def test_a_write_during_the_fence_is_503_and_changes_nothing(
    alice_api: Api, mailstore: Any, alice: Any
) -> None:
    await deliver(mailstore, alice, make_mail())
    _, folders = await alice_api.get("/v1/folders")
    inbox = next(f["id"] for f in folders["folders"] if f["name"] == "INBOX")
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    message = page["messages"][0]["id"]
    store = mailstore.stores["default"]
    mover = AccountMove(alice.id, store, store)
    await mover.set_fence(store, "out:east")
    status, body = await alice_api.request(
        "PATCH", f"/v1/messages/{message}", json={"flagged": True}
    )
    assert status == 503, body
    await mover.set_fence(store, None)
    _, after = await alice_api.get(f"/v1/messages/{message}")
    assert after["flagged"] is False, after
