"""Anti-spam on the HTTP API through a real rspamd (tests/rspamdserver.py):
moving a message into Junk with PATCH /v1/messages/{id} teaches rspamd
spam, moving it back out teaches ham (rspamd's Bayes counters in Redis);
the send (POST /v1/messages) refuses what rspamd calls spam with 422,
since outgoing mail has no Junk, and rspamd unreachable is 503."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from conf.settings import Settings
from delivery.learn import learner
from tests.conftest import make_settings
from tests.integration.http.conftest import (  # noqa: F401
    Api,
    alice,
    alice_api,
    base_url,
    bob,
    deliver,
    http,
    mailstore,
    make_mail,
    service,
)
from tests.rspamdserver import SPAM_TOKEN, RspamdServer, _free_port, rspamd  # noqa: F401


@pytest.fixture
def spam_overrides() -> dict:
    return {}


@pytest.fixture
def http_settings(tmp_path: Path, rspamd: RspamdServer, spam_overrides: dict) -> Settings:  # noqa: F811
    antispam = {
        "rspamd_url": rspamd.url,
        "controller_url": rspamd.controller_url,
        "password": rspamd.password,
        **spam_overrides,
    }
    if antispam["rspamd_url"] == "closed":  # nothing listens there
        antispam["rspamd_url"] = f"http://127.0.0.1:{_free_port()}"
    return make_settings(
        tmp_path / "data",
        http={"rate_limit_per_user": 10_000, "rate_limit_per_ip": 10_000},
        antispam=antispam,
    )


def text(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices("abcdefghijklmnop", k=rng.randrange(4, 9)))
                    for _ in range(n))


async def folder(api: Api, name: str) -> str:
    status, listing = await api.get("/v1/folders")
    assert status == 200
    return next(f["id"] for f in listing["folders"] if f["name"] == name)


async def test_moving_into_junk_and_back_teaches_spam_then_ham(
    alice_api: Api, alice: Any, mailstore: Any, rspamd: RspamdServer  # noqa: F811
) -> None:
    rng = random.Random()
    await deliver(mailstore, alice, make_mail(body=text(rng, 80)))
    inbox, junk = await folder(alice_api, "INBOX"), await folder(alice_api, "Junk")
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    url = f"/v1/messages/{page['messages'][0]['id']}"

    before = rspamd.learns()
    status, moved = await alice_api.request("PATCH", url, json={"folder_id": junk})
    assert status == 200, moved
    await learner().idle()
    want = {"spam": before["spam"] + 1, "ham": before["ham"]}
    as_spam = rspamd.learns_reach(want)
    assert as_spam == want, (before, as_spam)

    status, back = await alice_api.request(
        "PATCH", f"/v1/messages/{moved['id']}", json={"folder_id": inbox}
    )
    assert status == 200, back
    await learner().idle()
    # The same message relearned: its spam learn undone, ham learned.
    want = {"spam": as_spam["spam"] - 1, "ham": as_spam["ham"] + 1}
    assert rspamd.learns_reach(want) == want, as_spam


async def test_send_refuses_what_rspamd_calls_spam(
    alice_api: Api, alice: Any, bob: Any, mailstore: Any  # noqa: F811
) -> None:
    status, result = await alice_api.request("POST", "/v1/messages", json={
        "to": ["bob@example.test"], "subject": "offer",
        "text": f"{SPAM_TOKEN}\n{text(random.Random(), 40)}\n",
    })
    assert status == 422, result
    assert result["error"]["code"] == "content_rejected", result
    for box in ("INBOX", "Junk"):
        mail = mailstore.mail(bob)
        mailbox = await mail.get_mailbox(bob.id, box)
        assert (await mail.status(bob.id, mailbox.id)).messages == 0


@pytest.mark.parametrize("spam_overrides", [{"rspamd_url": "closed"}])
async def test_rspamd_down_is_503(
    alice_api: Api, bob: Any, mailstore: Any, http_settings: Settings  # noqa: F811
) -> None:
    assert http_settings.antispam.rspamd_url.startswith("http://127.0.0.1:")
    status, result = await alice_api.request("POST", "/v1/messages", json={
        "to": ["bob@example.test"], "subject": "hello", "text": "hello\n",
    })
    assert status == 503, result
