"""Webmail's sanitizer for large HTML runs in the content pool: a body past
the time limit is shown as plain text, never as a stalled server or a 500."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from httpapi.messages import SANITIZE_INLINE_LIMIT
from storage import contentpool
from tests.integration.http.conftest import Api, deliver, make_mail


def _large_html() -> tuple[str, str]:
    words = [random.randbytes(random.randrange(3, 9)).hex() for _ in range(9000)]
    visible = " ".join(words)
    markup = "<p>" + visible + "</p><script>alert(1)</script>"
    assert len(markup) > SANITIZE_INLINE_LIMIT
    return markup, visible


@pytest.fixture(params=["working", "hopeless"])
def pool(request: pytest.FixtureRequest) -> Iterator[str]:
    # hopeless: no job finishes within a microsecond, every sanitize times out.
    hopeless = request.param == "hopeless"
    contentpool.configure(1, time_limit=1e-6 if hopeless else 20.0, startup_allowance=0)
    yield request.param
    contentpool.configure(0)


async def test_large_html_is_sanitized_in_the_pool_or_shown_as_text(
    alice_api: Api, mailstore: Any, alice: Any, pool: str
) -> None:
    markup, visible = _large_html()
    await deliver(mailstore, alice, make_mail("Big", body="Plain version", html=markup))
    _, folders = await alice_api.get("/v1/folders")
    inbox = next(f["id"] for f in folders["folders"] if f["name"] == "INBOX")
    _, page = await alice_api.get(f"/v1/folders/{inbox}/messages")
    status, message = await alice_api.get(f"/v1/messages/{page['messages'][0]['id']}")
    assert status == 200
    assert message["text"].strip() == "Plain version"
    if pool == "working":
        assert message["html"].strip() == f"<p>{visible}</p>"
    else:
        assert message["html"] is None  # the client shows the plain-text view
