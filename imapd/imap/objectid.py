"""OBJECTID (RFC 8474) identifiers: MAILBOXID and EMAILID.

Storage's mailbox and message row ids are stable and never reused (schema
step 8, ``_v8_ids_never_reused``), and a message keeps its row across
MOVE, so they are what RFC 8474 sections 4 and 5.1 ask for. Sent as they
are, though, they would count every account's mail on the shard. So each id
goes through a keyed permutation of 64-bit numbers (a four-round Feistel
network with HMAC-SHA256 rounds, keyed by a site secret and tweaked by the
account and the kind of object): distinct ids stay distinct, the client
learns nothing from them, and the server decodes one back to the row id
without a table. RFC 8474 section 3: 1 to 255 of ALPHA, DIGIT, "_" and "-";
a letter first (F mailbox, M email) keeps them atoms.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import struct

# The shared secret's name (Directory.shared_secret): every instance of the
# site encodes ids the same way.
SECRET_NAME = "imap-objectid"
_MASK32 = 0xFFFFFFFF
_ROUNDS = 4
_SHAPE = re.compile(r"[FM][0-9a-f]{16}")


class ObjectIds:
    """Encodes and decodes one site's object ids."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    def new_key(cls) -> bytes:
        return secrets.token_bytes(32)

    def _round(self, tweak: bytes, n: int, half: int) -> int:
        digest = hmac.digest(self._key, tweak + struct.pack(">BI", n, half), hashlib.sha256)
        return int.from_bytes(digest[:4], "big")

    def _permute(self, tweak: bytes, value: int, forward: bool) -> int:
        left, right = value >> 32, value & _MASK32
        if forward:
            for n in range(_ROUNDS):
                left, right = right, left ^ self._round(tweak, n, right)
        else:
            for n in reversed(range(_ROUNDS)):
                left, right = right ^ self._round(tweak, n, left), left
        return (left << 32) | right

    @staticmethod
    def _tweak(kind: str, account_id: int) -> bytes:
        return kind.encode() + struct.pack(">Q", account_id)

    def encode(self, kind: str, account_id: int, row_id: int) -> str:
        """``kind`` "F" (MAILBOXID) or "M" (EMAILID) of a row id below 2**64."""
        return f"{kind}{self._permute(self._tweak(kind, account_id), row_id, True):016x}"

    def decode(self, kind: str, account_id: int, objectid: str) -> int | None:
        """The row id ``objectid`` names, or None when it is not one of this
        account's ids of that kind (a client may send anything)."""
        if not _SHAPE.fullmatch(objectid) or objectid[0] != kind:
            return None
        return self._permute(self._tweak(kind, account_id), int(objectid[1:], 16), False)
