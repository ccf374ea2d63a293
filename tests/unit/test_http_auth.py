"""Bearer tokens: signed, expiring, bound to the password; the shared key file."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

from httpapi.auth import TokenSigner, load_or_create_secret
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


def test_secret_file_is_created_once_private_and_shared(tmp_path: Path) -> None:
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_secret(tmp_path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) == 32
    path = tmp_path / "http_secret"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["http_secret"]  # no temp files left
    assert load_or_create_secret(tmp_path) == results[0]
