"""``/v1/settings/spam`` (httpapi/spam.py): a user reads and replaces their
own sender lists and Junk threshold over real HTTP (urllib, aiohttp); what
the API stores is what the MX reads; junk input is a 400 naming the fault
with nothing changed; another account's settings are out of reach."""

from __future__ import annotations

import asyncio
import json
import random
import string
import urllib.error
import urllib.request
from typing import Any

import pytest

from storage.model import SpamPolicy
from tests.integration.http.conftest import Api

EMPTY = {"allow": [], "block": [], "junk_threshold": None}


def urllib_call(api: Api, method: str, body: Any = None) -> tuple[int, Any]:
    """One request with the standard library's client, bearer token and all."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        api.base + "/v1/settings/spam",
        data=data,
        method=method,
        headers={**api.headers, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _label(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10)))


async def test_round_trip_normalised_and_read_by_the_mx(
    alice_api: Api, bob_api: Api, mailstore: Any
) -> None:
    assert await asyncio.to_thread(urllib_call, alice_api, "GET") == (200, EMPTY)
    rng = random.Random()
    domains = sorted({f"{_label(rng)}.example" for _ in range(rng.randint(3, 30))})
    body = {
        "allow": ["Boss@Corp.Example", *(f"*.{d.upper()}" for d in domains)],
        "block": ["corp.example", "bücher.example"],
        "junk_threshold": 4.5,
    }
    status, stored = await asyncio.to_thread(urllib_call, alice_api, "PUT", body)
    assert status == 200, stored
    expected = {
        "allow": sorted(["boss@corp.example", *(f"*.{d}" for d in domains)]),
        "block": ["corp.example", "xn--bcher-kva.example"],
        "junk_threshold": 4.5,
    }
    assert stored == expected
    assert await asyncio.to_thread(urllib_call, alice_api, "GET") == (200, expected)
    # What the delivery path reads is what the API wrote...
    account = await mailstore.directory.get_account("alice@example.test")
    assert await mailstore.mail(account).spam_policy(account.id) == SpamPolicy(
        tuple(expected["allow"]), tuple(expected["block"]), 4.5
    )
    # ...for alice alone: bob's settings are his own.
    assert await bob_api.get("/v1/settings/spam") == (200, EMPTY)
    # PUT replaces the whole: a missing key is empty (null).
    assert await alice_api.request("PUT", "/v1/settings/spam", json={"block": ["x.example"]}) == (
        200,
        {"allow": [], "block": ["x.example"], "junk_threshold": None},
    )
    assert await alice_api.request("PUT", "/v1/settings/spam", json={}) == (200, EMPTY)


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"allow": [".example.com"]}, "invalid_entry", "write *.example.com"),
        ({"block": ["not an address"]}, "invalid_entry", "not an address"),
        ({"block": ["*@example.com"]}, "invalid_entry", "write example.com"),
        ({"allow": ["a.example"], "block": ["A.example"]}, "invalid_field", "both lists"),
        ({"allow": ["a.example", "a.example."]}, "invalid_field", "twice"),
        ({"allow": "a.example"}, "invalid_field", "list of strings"),
        ({"allow": [1]}, "invalid_field", "list of strings"),
        ({"allow": ["x.example"] * 1001}, "invalid_field", "at most 1000"),
        ({"junk_threshold": "5"}, "invalid_field", "number or null"),
        ({"junk_threshold": True}, "invalid_field", "number or null"),
        ({"junk_threshold": 1e9}, "invalid_field", "-1000 to 1000"),
        ({"threshold": 5}, "invalid_field", "unknown field"),
        (["a.example"], "invalid_json", "JSON object"),
    ],
)
async def test_junk_is_a_400_and_changes_nothing(
    alice_api: Api, body: Any, code: str, words: str
) -> None:
    kept = {"allow": ["keep.example"], "block": [], "junk_threshold": 3.0}
    assert (await alice_api.request("PUT", "/v1/settings/spam", json=kept))[0] == 200
    status, answer = await asyncio.to_thread(urllib_call, alice_api, "PUT", body)
    assert status == 400, answer
    assert answer["error"]["code"] == code and words in answer["error"]["message"], answer
    assert await alice_api.get("/v1/settings/spam") == (200, kept)


async def test_an_oversized_body_is_413(alice_api: Api) -> None:
    huge = {"allow": ["a" * 60 + f"{i}.example" for i in range(8000)]}
    status, answer = await alice_api.request("PUT", "/v1/settings/spam", json=huge)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    assert await alice_api.get("/v1/settings/spam") == (200, EMPTY)


async def test_no_credentials_no_settings(alice_api: Api) -> None:
    async with alice_api.session.get(alice_api.base + "/v1/settings/spam") as reply:
        assert reply.status == 401
    async with alice_api.session.put(
        alice_api.base + "/v1/settings/spam", json={"block": ["x.example"]}
    ) as reply:
        assert reply.status == 401
    assert await alice_api.get("/v1/settings/spam") == (200, EMPTY)
