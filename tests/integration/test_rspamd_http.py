"""Anti-spam on the HTTP API through a real rspamd (tests/rspamdserver.py):
the send (POST /v1/messages) refuses what rspamd calls spam with 422,
since outgoing mail has no Junk, and rspamd unreachable is 503."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from conf.settings import Settings
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
