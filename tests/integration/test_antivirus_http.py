"""Anti-virus on the HTTP API's send (POST /v1/messages), through a real clamd
(tests/clamdserver.py): EICAR in the text, as an attachment (sent base64)
and inside a zipped attachment is refused with 422 ``content_rejected``
naming the signature, and nothing is delivered, queued or kept in Sent;
clean mail goes through with its attachment intact; clamd down is 503 with
Retry-After."""

from __future__ import annotations

import base64
import email
import email.policy
import io
import random
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conf.settings import Settings
from storage.model import UidSet
from tests.clamdserver import EICAR, SIGNATURE_PREFIX, ClamdServer, clamd  # noqa: F401
from tests.conftest import make_settings
from tests.integration.http.conftest import (  # noqa: F401
    Api,
    alice,
    alice_api,
    base_url,
    bob,
    http,
    mailstore,
    service,
)


@pytest.fixture
def http_settings(tmp_path: Path, clamd: ClamdServer) -> Settings:  # noqa: F811
    return make_settings(
        tmp_path / "data",
        http={"rate_limit_per_user": 10_000, "rate_limit_per_ip": 10_000},
        antivirus={"enabled": True, "clamd_socket": clamd.socket_path},
    )


def attachment(filename: str, content_type: str, data: bytes) -> dict[str, str]:
    return {"filename": filename, "content_type": content_type,
            "content": base64.b64encode(data).decode()}


def zipped(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("docs/eicar.com", data)
    assert data not in buf.getvalue()
    return buf.getvalue()


INFECTED = {
    "plain": {"text": "Hello\n" + EICAR.decode() + "\n"},
    "base64": {"text": "attached", "attachments": [
        attachment("eicar.com", "application/octet-stream", EICAR)]},
    "zip": {"text": "attached", "attachments": [
        attachment("files.zip", "application/zip", zipped(EICAR))]},
}


async def count(store: Any, account: Any, mailbox: str) -> int:
    box = await store.mail(account).get_mailbox(account.id, mailbox)
    return (await store.mail(account).status(account.id, box.id)).messages


@pytest.mark.parametrize("kind", sorted(INFECTED))
async def test_send_refuses_eicar(
    alice_api: Api, alice: Any, bob: Any, mailstore: Any, kind: str  # noqa: F811
) -> None:
    status, result = await alice_api.request("POST", "/v1/messages", json={
        "to": ["bob@example.test", "carol@remote.example"], "subject": f"eicar {kind}",
        **INFECTED[kind],
    })
    assert status == 422, result
    assert result["error"]["code"] == "content_rejected"
    assert SIGNATURE_PREFIX in result["error"]["message"]
    assert await count(mailstore, bob, "INBOX") == 0
    assert await count(mailstore, alice, "Sent") == 0
    assert await mailstore.queue.list() == []


async def test_multipart_upload_of_eicar_is_refused(
    alice_api: Api, bob: Any, mailstore: Any  # noqa: F811
) -> None:
    form = aiohttp.FormData()
    form.add_field("to", "bob@example.test")
    form.add_field("text", "zip attached")
    form.add_field("attachment", zipped(EICAR), filename="x.zip", content_type="application/zip")
    status, result = await alice_api.request("POST", "/v1/messages", data=form)
    assert status == 422 and SIGNATURE_PREFIX in result["error"]["message"], result
    assert await count(mailstore, bob, "INBOX") == 0


@pytest.mark.parametrize("seed", range(3))
async def test_send_passes_clean_mail(
    alice_api: Api, bob: Any, mailstore: Any, seed: int  # noqa: F811
) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(rng.randrange(1, 300_000))
    status, result = await alice_api.request("POST", "/v1/messages", json={
        "to": ["bob@example.test"], "subject": "clean", "text": "data attached",
        "attachments": [attachment("data.bin", "application/octet-stream", payload)],
    })
    assert status == 202, result
    box = await mailstore.mail(bob).get_mailbox(bob.id, "INBOX")
    [stored] = await mailstore.mail(bob).fetch(bob.id, box.id, UidSet.all())
    raw = await mailstore.blobs.get(stored.entry.blob_key)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    [part] = list(parsed.iter_attachments())  # type: ignore[attr-defined]
    assert part.get_content() == payload
    assert b"X-Virus-Scanned" not in raw


async def test_clamd_down_is_503(
    alice_api: Api, bob: Any, mailstore: Any, clamd: ClamdServer  # noqa: F811
) -> None:
    clamd.pause()
    try:
        async with alice_api.session.post(
            alice_api.base + "/v1/messages", headers=alice_api.headers,
            json={"to": ["bob@example.test"], "text": "hello"},
        ) as resp:
            status, result = resp.status, await resp.json()
            retry_after = resp.headers.get("Retry-After")
    finally:
        clamd.resume()
    assert status == 503 and result["error"]["code"] == "unavailable", result
    assert retry_after and int(retry_after) > 0
    assert await count(mailstore, bob, "INBOX") == 0
