"""argon2id verification through libsodium (PyNaCl), hashing through argon2-cffi.

Why (issue #24): for the same stored hash (``m=65536,t=3,p=4``) libsodium's
``crypto_pwhash_str_verify`` costs about half the CPU of argon2-cffi's
``verify`` (127 vs 208 ms, ``bench/argon2_verify_bench.py``; libsodium
picks a vectorised block function at run time and starts no thread per
lane). Both read and write the same PHC string (``$argon2id$v=19$m=...,
t=...,p=...$salt$hash``, RFC 9106 section 4 costs), so nothing stored
changes. libsodium computes every lane on the calling
thread, which is what a bounded verification pool wants anyway.

libsodium can only make hashes of one lane (``p=1``), so new hashes are
still made by argon2-cffi with the configured parallelism; and it refuses
what its decoder does not take (output under 16 bytes, salt under 8, a
string of 128 bytes or more, another type or version): those are verified
by argon2-cffi, as before.
"""

from __future__ import annotations

import argon2
import nacl.exceptions
import nacl.pwhash
from argon2.exceptions import InvalidHashError, VerifyMismatchError

SODIUM_MAX_STRING = 127  # crypto_pwhash_STRBYTES - 1
SODIUM_MIN_OUTPUT = 16  # ARGON2_MIN_OUTLEN
SODIUM_MIN_SALT = 8  # ARGON2_MIN_SALT_LENGTH


def sodium_can_verify(password_hash: str) -> bool:
    """Whether libsodium's decoder takes ``password_hash`` (an argon2id
    v1.3 PHC string within its length limits)."""
    if (
        len(password_hash) > SODIUM_MAX_STRING
        or not password_hash.isascii()
        or not password_hash.startswith("$argon2id$")
    ):
        return False
    try:
        params = argon2.extract_parameters(password_hash)
    except (InvalidHashError, ValueError):
        return False
    return (
        params.version == 0x13
        and params.hash_len >= SODIUM_MIN_OUTPUT
        and params.salt_len >= SODIUM_MIN_SALT
    )


class SodiumPasswordHasher(argon2.PasswordHasher):
    """An argon2-cffi ``PasswordHasher`` (same constructor, same hashes,
    same ``check_needs_rehash``) whose :meth:`verify` runs libsodium where
    it can. Contract of ``verify``: True if ``password`` matches, else
    ``VerifyMismatchError`` (or ``InvalidHashError`` for a malformed hash
    from argon2-cffi); the GIL is released during the computation."""

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        text = hash.decode("ascii", "replace") if isinstance(hash, bytes) else hash
        if not sodium_can_verify(text):
            return super().verify(hash, password)
        secret = password.encode("utf-8") if isinstance(password, str) else password
        try:
            return bool(nacl.pwhash.argon2id.verify(text.encode("ascii"), secret))
        except nacl.exceptions.InvalidkeyError:
            raise VerifyMismatchError("libsodium: the password does not match") from None
