"""Bearer tokens: signed, expiring, bound to the password; a key file of an older version."""

from __future__ import annotations

import datetime as dt
import os
import random
from pathlib import Path

from httpapi.auth import TokenSigner, read_legacy_secret
from storage.model import Account


def account(password_hash: str = "$argon2id$v=19$abc") -> Account:
    return Account(7, "alice@example.test", password_hash, "default", None,
                   dt.datetime(2024, 1, 1, tzinfo=dt.UTC))


def test_token_round_trip_and_expiry() -> None:
    signer = TokenSigner(b"s" * 32, lifetime_seconds=3600)
    token, expires = signer.issue(account(), now=1_000_000)
    assert expires == 1_003_600
    claims = signer.verify(token, now=1_000_100)
    assert claims is not None and claims.account_id == 7
    assert claims.fingerprint == signer.fingerprint(account())
    assert signer.verify(token, now=1_003_601) is None


def test_tampered_or_foreign_tokens_are_rejected() -> None:
    signer = TokenSigner(b"s" * 32, 3600)
    token, _ = signer.issue(account())
    prefix, payload, mac = token.split(".")
    forged_payload = ("A" if payload[0] != "A" else "B") + payload[1:]
    assert signer.verify(f"{prefix}.{forged_payload}.{mac}") is None
    assert signer.verify(token[:-2]) is None
    assert TokenSigner(b"t" * 32, 3600).verify(token) is None
    for junk in ["", "sm1", "sm1..", "Bearer x", "sm1.!!!.???", "x" * 1000]:
        assert signer.verify(junk) is None


def test_password_change_changes_the_fingerprint() -> None:
    signer = TokenSigner(b"s" * 32, 3600)
    assert signer.fingerprint(account("h1")) != signer.fingerprint(account("h2"))


def test_a_legacy_key_file_is_read_only_if_whole(tmp_path: Path) -> None:
    """An older version's data_dir/http_secret is adopted; a short file (a
    crash while writing) or none gives None."""
    assert read_legacy_secret(tmp_path) is None
    key = os.urandom(32 + random.randint(0, 31))
    (tmp_path / "http_secret").write_bytes(key)
    assert read_legacy_secret(tmp_path) == key
    (tmp_path / "http_secret").write_bytes(key[: random.randint(0, 31)])
    assert read_legacy_secret(tmp_path) is None

