"""The API's read path: tokens checked from a short in-process cache that
still honours revocation, list pages and message reads served from caches
that change nothing a client sees (issue #20)."""

from __future__ import annotations

from typing import Any

import aiohttp
import argon2

from tests.integration.http.conftest import login


async def test_a_token_from_the_login_that_upgrades_the_hash_is_valid(
    base_url: str, http: aiohttp.ClientSession, mailstore: Any, alice: Any
) -> None:
    """A login that rehashes the password with the current argon2 cost
    issues a token bound to the new hash, not to the one it replaced."""
    mailstore.directory.hasher = argon2.PasswordHasher(
        time_cost=1, memory_cost=16, parallelism=1
    )
    api = await login(base_url, http, alice)
    status, me = await api.get("/v1/me")
    assert status == 200, me
    assert me["address"] == alice.address
