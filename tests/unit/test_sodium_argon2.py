"""storage/sodium_argon2.py: libsodium verifies what argon2-cffi hashed
(the stored $argon2id$ strings do not change), argon2-cffi verifies what
libsodium cannot decode, and both agree on every answer."""

from __future__ import annotations

import secrets
import string

import argon2
import nacl.pwhash
import pytest
from argon2.exceptions import VerifyMismatchError
from argon2.profiles import CHEAPEST

from storage import password_hasher
from storage.sodium_argon2 import SodiumPasswordHasher, sodium_can_verify

ALPHABET = string.ascii_letters + string.digits + "äöüß €!#\"'\\"


def random_password() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(secrets.randbelow(40) + 1))


@pytest.fixture
def sodium_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The hashes libsodium was asked to verify."""
    calls: list[bytes] = []
    real = nacl.pwhash.argon2id.verify

    def spy(password_hash: bytes, password: bytes) -> bool:
        calls.append(password_hash)
        return real(password_hash, password)

    monkeypatch.setattr(nacl.pwhash.argon2id, "verify", spy)
    return calls


@pytest.mark.parametrize("parallelism", [1, 2, 4])
def test_libsodium_verifies_argon2_cffi_hashes(parallelism: int, sodium_calls: list) -> None:
    memory = 8 * parallelism * secrets.choice([8, 16, 64])
    maker = argon2.PasswordHasher(
        time_cost=secrets.choice([1, 2, 3]), memory_cost=memory, parallelism=parallelism
    )
    checker = SodiumPasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    password = random_password()
    stored = maker.hash(password)
    assert stored.startswith("$argon2id$v=19$") and sodium_can_verify(stored)
    assert checker.verify(stored, password) is True
    for wrong in (password + "x", password[:-1], random_password() + "!"):
        with pytest.raises(VerifyMismatchError):
            checker.verify(stored, wrong)
        with pytest.raises(VerifyMismatchError):  # argon2-cffi agrees
            maker.verify(stored, wrong)
    assert len(sodium_calls) == 4, "libsodium was not the one verifying"


def test_libsodium_hashes_verify_with_argon2_cffi() -> None:
    password = random_password()
    stored = nacl.pwhash.argon2id.str(password.encode(), opslimit=2, memlimit=8 * 1024 * 1024)
    assert argon2.PasswordHasher().verify(stored.decode(), password)


def test_what_libsodium_cannot_decode_goes_to_argon2_cffi(sodium_calls: list) -> None:
    checker = SodiumPasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    password = random_password()
    cheapest = argon2.PasswordHasher.from_parameters(CHEAPEST).hash(password)  # 4-byte output
    long_output = argon2.PasswordHasher(
        time_cost=1, memory_cost=8, parallelism=1, hash_len=64
    ).hash(password)  # 136 characters
    argon2i = argon2.PasswordHasher(
        time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.I
    ).hash(password)
    for stored in (cheapest, long_output, argon2i):
        assert not sodium_can_verify(stored)
        assert checker.verify(stored, password) is True
        with pytest.raises(VerifyMismatchError):
            checker.verify(stored, password + "x")
    assert sodium_calls == []


def test_the_configured_hasher_hashes_at_the_configured_cost() -> None:
    from conf.settings import Settings

    auth = Settings.model_validate(
        {"auth": {"argon2_time_cost": 2, "argon2_memory_kib": 96, "argon2_parallelism": 3}}
    ).auth
    hasher = password_hasher(auth)
    assert isinstance(hasher, SodiumPasswordHasher)
    stored = hasher.hash("pw")
    assert "$m=96,t=2,p=3$" in stored
    assert not hasher.check_needs_rehash(stored)
    assert hasher.check_needs_rehash(argon2.PasswordHasher.from_parameters(CHEAPEST).hash("pw"))
