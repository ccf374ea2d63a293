"""The authentication cache: successful password checks remembered for a
while, so a returning client's login costs no argon2 run (issue #24; the
idea of Dovecot's ``auth_cache``).

What is stored: per successful check, ``HMAC-SHA256(key, account id ||
password)`` -> (expiry, the password hash the check matched). ``key`` is
random per process and never leaves it, so the cache holds neither a
password nor anything a password could be guessed from offline faster than
from the argon2 hash itself.

When an entry counts (:meth:`AuthCache.hit`): only for the exact account
and password that succeeded, only before its expiry (``ttl`` seconds after
the check, not extended by hits), and only while the account's row, read
again for this login, still holds the very hash that was matched. A new
password (``mailctl account passwd`` in any process, on any instance: the
new hash has a new salt), a removed account (no row) or a rehash at another
cost all miss at once, whether or not any notification reached this
process. A wrong password can never hit: its HMAC differs. Failures are
never stored.

The cache sits behind the login gate (:mod:`storage.throttle`): the throttle
delay is waited out before the cache is asked, so a hit answers no sooner
than a miss would have been started, and only a caller who already holds
the right password ever sees one.

Beside it, the login names that succeeded (:meth:`AuthCache.knows_login`:
``HMAC-SHA256(key, "L" || login || password)`` -> expiry, as long as the
entries above): the gate asks it before it reads anything, so that a
returning client with the right password does not wait for one of its
address's places in the verification pool (issue #23: a pool of 20
submission sessions from one address). It only says "try the account's
row"; the entry above, checked against the row, still decides.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from storage.model import Account

MAX_ENTRIES = 100_000  # bounds memory (about 200 bytes each); the oldest go first


class AuthCache:
    """Successful verifications of one process; ``ttl`` > 0 seconds.

    Every method is O(1) and runs on the event loop (one HMAC of a short
    string: microseconds). ``clock`` is for tests."""

    def __init__(
        self,
        ttl: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError("an authentication cache needs a positive ttl")
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self._clock = clock
        self._key = secrets.token_bytes(32)
        # digest -> (monotonic expiry, password hash matched); oldest first.
        self._entries: collections.OrderedDict[bytes, tuple[float, str]] = collections.OrderedDict()
        # digest of (login, password) -> monotonic expiry; oldest first.
        self._logins: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _digest(self, account_id: int, password: str) -> bytes:
        # surrogatepass: a password that is not valid UTF-8 still has one key.
        message = b"%d\0" % account_id + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def hit(self, account: Account, password: str) -> bool:
        """Whether ``password`` is known right for ``account`` as its row
        reads now (see the module docstring); a stale entry is dropped."""
        digest = self._digest(account.id, password)
        entry = self._entries.get(digest)
        if entry is not None:
            expiry, matched = entry
            if expiry > self._clock() and hmac.compare_digest(matched, account.password_hash):
                self.hits += 1
                return True
            del self._entries[digest]
        self.misses += 1
        return False

    def remember(self, account: Account, password: str) -> None:
        """Records that ``password`` matched ``account.password_hash`` just now."""
        digest = self._digest(account.id, password)
        self._entries.pop(digest, None)
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[digest] = (self._clock() + self.ttl, account.password_hash)

    def _login_digest(self, login: str, password: str) -> bytes:
        # "L": never the message of an account's digest (those start with a digit).
        message = b"L%s\0%s" % (
            login.strip().lower().encode("utf-8", "surrogatepass"),
            password.encode("utf-8", "surrogatepass"),
        )
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def knows_login(self, login: str, password: str) -> bool:
        """Whether ``password`` succeeded for ``login`` (case and spaces
        aside) within the ttl: a hint that :meth:`hit` will answer, never
        an answer itself. A wrong password is never known."""
        digest = self._login_digest(login, password)
        expiry = self._logins.get(digest)
        if expiry is None:
            return False
        if expiry > self._clock():
            return True
        del self._logins[digest]
        return False

    def remember_login(self, login: str, password: str) -> None:
        """Records that ``password`` succeeded for ``login`` just now."""
        digest = self._login_digest(login, password)
        self._logins.pop(digest, None)
        while len(self._logins) >= self.max_entries:
            self._logins.popitem(last=False)
        self._logins[digest] = self._clock() + self.ttl

    def clear(self) -> None:
        self._entries.clear()
        self._logins.clear()
