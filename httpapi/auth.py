"""Who is calling: signed bearer tokens and HTTP Basic with the account password.

Tokens are self-contained and HMAC-SHA256 signed, so any instance can check
them without a storage round trip for the token itself:
``sm1.<payload>.<mac>`` where the payload carries the account id, the expiry
and a fingerprint of the account's password hash (a password change
invalidates every token issued before it). The key is random per site and
kept in the directory (``Directory.shared_secret``, see
:func:`httpapi.service.site_token_key`): the first instance to start stores
it and every other, on any host, reads the same key, so they all accept
each other's tokens.

A verified token's account is remembered in-process for at most
``TOKEN_CACHE_SECONDS``, keyed by a hash of the token (never the token), so
a busy client costs no directory read per request. Revocation still holds:
a password change, a removal or a move made through this process's
directory, or a move heard on the event bus, drops every remembered account
at once (the directory's ``generation``); one made by another process
(``mailctl``, another instance) is honoured within ``TOKEN_CACHE_SECONDS``.

HTTP Basic (RFC 7617) takes the account address and password, for scripts.
Argon2 costs tens of milliseconds, so a successful Basic login is
remembered briefly under an HMAC of the credentials (never the password).

Passwords are checked through the process's :class:`storage.throttle.LoginGate`
(failures counted by client IP and login name, and delayed, as on every other
protocol); a directory outage is a 503, never a 401.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from httpapi.errors import ApiError
from runtime.metrics import AUTH_FAILURES
from storage.api import Storage
from storage.errors import ErrorKind, StorageError
from storage.model import Account
from storage.throttle import LoginClient, LoginGate

SECRET_FILE = "http_secret"  # where versions before the directory's key kept it
SECRET_NAME = "http token key"  # its name among the directory's shared secrets
SECRET_BYTES = 32
TOKEN_PREFIX = "sm1"
_PAYLOAD = struct.Struct(">QQ8s")  # account id, expiry (unix seconds), password fingerprint
BASIC_CACHE_SECONDS = 60.0
BASIC_CACHE_MAX = 10_000
# How late a password change or removal made by another process is
# honoured by a token this process checked before it (see the module doc).
TOKEN_CACHE_SECONDS = 5.0
TOKEN_CACHE_MAX = 10_000  # tokens remembered; the cache starts over when full
REALM = "shardmail"


def read_legacy_secret(data_dir: Path) -> bytes | None:
    """The key an older version kept in ``data_dir/http_secret``, if any: the
    site adopts it, so tokens issued before an upgrade stay valid. Blocking:
    call through ``asyncio.to_thread``."""
    try:
        data = (data_dir / SECRET_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return data if len(data) >= SECRET_BYTES else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class TokenClaims:
    account_id: int
    expires: int
    fingerprint: bytes


class TokenSigner:
    """Issues and verifies bearer tokens with one site key."""

    def __init__(self, secret: bytes, lifetime_seconds: int) -> None:
        self._key = hashlib.sha256(b"shardmail token v1\0" + secret).digest()
        self.lifetime = lifetime_seconds

    def fingerprint(self, account: Account) -> bytes:
        return hmac.new(self._key, account.password_hash.encode(), hashlib.sha256).digest()[:8]

    def issue(self, account: Account, now: float | None = None) -> tuple[str, int]:
        """A token for ``account`` and its expiry (unix seconds)."""
        expires = int(now if now is not None else time.time()) + self.lifetime
        payload = _b64(_PAYLOAD.pack(account.id, expires, self.fingerprint(account)))
        mac = hmac.new(self._key, f"{TOKEN_PREFIX}.{payload}".encode(), hashlib.sha256).digest()
        return f"{TOKEN_PREFIX}.{payload}.{_b64(mac)}", expires

    def verify(self, token: str, now: float | None = None) -> TokenClaims | None:
        """The claims of a well-signed, unexpired token, else None. The
        caller still checks the fingerprint against the current account."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX or len(token) > 256:
            return None
        try:
            mac = _unb64(parts[2])
            raw = _unb64(parts[1])
        except (binascii.Error, ValueError):
            return None
        good = hmac.new(self._key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(mac, good) or len(raw) != _PAYLOAD.size:
            return None
        account_id, expires, fingerprint = _PAYLOAD.unpack(raw)
        if expires < (now if now is not None else time.time()):
            return None
        return TokenClaims(account_id, expires, fingerprint)

    def credentials_key(self, login: str, password: str) -> bytes:
        return hmac.new(self._key, f"{login}\0{password}".encode(), hashlib.sha256).digest()


def unauthorized(message: str = "authentication required") -> ApiError:
    # RFC 9110 section 11.6.1: a 401 carries WWW-Authenticate. Bearer is
    # listed first: browsers would pop a login dialog for a Basic challenge.
    return ApiError(
        401,
        "unauthorized",
        message,
        {"WWW-Authenticate": f'Bearer realm="{REALM}", Basic realm="{REALM}", charset="UTF-8"'},
    )


@dataclass(frozen=True)
class _Remembered:
    account: Account
    expires: int  # the token's own expiry (unix seconds)
    until: float  # monotonic time this entry may be used to
    generation: int  # the directory's generation when the account was read


class Authenticator:
    """Turns request credentials into an :class:`Account`, or a 401."""

    def __init__(
        self,
        storage: Storage,
        signer: TokenSigner,
        logins: LoginGate,
        token_cache_seconds: float = TOKEN_CACHE_SECONDS,
    ) -> None:
        self.storage = storage
        self.signer = signer
        self.logins = logins
        self.token_cache_seconds = token_cache_seconds
        self._basic_cache: dict[bytes, tuple[int, float]] = {}
        self._tokens: dict[bytes, _Remembered] = {}

    async def login(self, address: str, password: str, client_ip: str) -> Account:
        """Checks a password through the login gate: 401 when it is wrong,
        TEMPORARY (503) when it cannot be checked now."""
        account = await self.logins.authenticate(
            self.storage.directory, address, password, LoginClient(client_ip)
        )
        if account is None:
            AUTH_FAILURES.inc(protocol="http")
            raise ApiError(401, "auth_failed", "invalid address or password")
        return account

    def _generation(self) -> int | None:
        """The directory's change counter; None (never cache) for a
        directory without one."""
        generation = getattr(self.storage.directory, "generation", None)
        return generation if isinstance(generation, int) else None

    async def from_token(self, token: str) -> Account:
        """The token's account: from the cache when this token was checked
        less than ``token_cache_seconds`` ago and the directory has not
        changed since, else verified and read afresh (see the module doc)."""
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        generation = self._generation()
        hit = self._tokens.get(key)
        if (
            hit is not None
            and hit.generation == generation
            and hit.until > time.monotonic()
            and hit.expires >= time.time()
        ):
            return hit.account
        account, expires = await self._check_token(token)
        if generation is not None and self.token_cache_seconds > 0:
            if len(self._tokens) >= TOKEN_CACHE_MAX:
                self._tokens.clear()  # bounded: a flood of tokens costs reads, not memory
            until = time.monotonic() + self.token_cache_seconds
            self._tokens[key] = _Remembered(account, expires, until, generation)
        return account

    async def _check_token(self, token: str) -> tuple[Account, int]:
        """Signature, expiry, and the current account's password fingerprint."""
        claims = self.signer.verify(token)
        if claims is None:
            raise unauthorized("invalid or expired token")
        try:
            account = await self.storage.directory.get_account_by_id(claims.account_id)
        except StorageError as exc:
            if exc.kind is not ErrorKind.NOT_FOUND:
                raise  # an outage is 503 (errors_middleware), not a bad token
            raise unauthorized("invalid or expired token") from None
        if not hmac.compare_digest(self.signer.fingerprint(account), claims.fingerprint):
            raise unauthorized("invalid or expired token")  # password changed since
        return account, claims.expires

    async def from_basic(self, encoded: str, client_ip: str) -> Account:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise unauthorized("malformed Basic credentials") from None
        login, sep, password = decoded.partition(":")  # RFC 7617 section 2
        if not sep or not login:
            raise unauthorized("malformed Basic credentials")
        key = self.signer.credentials_key(login.lower(), password)
        now = time.monotonic()
        cached = self._basic_cache.get(key)
        if cached and cached[1] > now:
            try:
                return await self.storage.directory.get_account_by_id(cached[0])
            except StorageError as exc:
                if exc.kind is not ErrorKind.NOT_FOUND:
                    raise
                self._basic_cache.pop(key, None)
        try:
            account = await self.login(login, password, client_ip)
        except ApiError:
            raise unauthorized("invalid address or password") from None
        if len(self._basic_cache) >= BASIC_CACHE_MAX:
            self._basic_cache = {k: v for k, v in self._basic_cache.items() if v[1] > now}
            if len(self._basic_cache) >= BASIC_CACHE_MAX:
                self._basic_cache.clear()
        self._basic_cache[key] = (account.id, now + BASIC_CACHE_SECONDS)
        return account

    async def from_header(self, header: str | None, client_ip: str) -> Account:
        """``Authorization: Bearer <token>`` or ``Basic <base64>`` (RFC 9110 11.6.2)."""
        if not header:
            raise unauthorized()
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return await self.from_token(value.strip())
        if scheme == "basic":
            return await self.from_basic(value.strip(), client_ip)
        raise unauthorized("unsupported authentication scheme")
