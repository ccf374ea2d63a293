"""Sender Rewriting Scheme (SRS) for mail an alias forwards out.

A message that an alias of ours forwards to another site still carries its
original reverse-path; the next hop checks that path's SPF record (RFC 7208
section 2.4) against our address and fails it. So the forwarded copy is
queued with a reverse-path of our own domain that encodes the original one,
and a bounce sent to that address comes back to us and is routed to the
original sender. The address format is the one every SRS implementation
uses (Shevek's "Sender Rewriting Scheme" paper, as in libsrs2 and
postsrsd), so forwarders and bounce handlers interoperate:

    SRS0=HHHH=TT=orig-domain=orig-local@our-domain
    SRS1=HHHH=first-forwarder==HHHH=TT=orig-domain=orig-local@our-domain

``HHHH`` is the first four characters of the base64 HMAC-SHA1 of the rest
(lower-cased) under our secret, ``TT`` the day of issue modulo 1024 in two
base32 characters. A forwarded SRS0 address becomes SRS1 (the first
forwarder kept, so a bounce goes straight back to it); an SRS1 address is
re-signed. Reversing checks the hash (in constant time, case-blind: some
MTAs lower-case local parts) and the age (``max_age_days``), so the
domain is no open relay.

Contract: :meth:`Srs.forward` never raises for an address with an ``@``;
:meth:`Srs.reverse` returns the address to route to, or raises
:class:`SrsError` for a forged, damaged or expired SRS address, and
returns None for an address that is not SRS at all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import weakref
from dataclasses import dataclass

from conf.settings import Settings
from storage.api import Storage

BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
HASH_LENGTH = 4
DAY_SECONDS = 86_400
TIME_SLOTS = 1024  # two base32 characters
SECRET_NAME = "srs"  # in the directory's shared_secrets


class SrsError(ValueError):
    """An SRS address that is forged, damaged or too old (550 5.1.1)."""


def _is_srs(local: str) -> str | None:
    """ "SRS0" / "SRS1" if ``local`` is an SRS local part, else None. The
    tag is followed by one separator: '=', '+' or '-' (what forwarders use)."""
    tag = local[:4].upper()
    if tag in ("SRS0", "SRS1") and len(local) > 5 and local[4] in "=+-":
        return tag
    return None


def _split_srs1(local: str) -> tuple[str, str, str] | None:
    """``SRS1=HHHH=first==HHHH=TT=domain=local`` as (hash, first forwarder,
    the SRS0 part after its tag: it starts with that part's separator)."""
    hashed, sep, rest = local[5:].partition("=")
    first, sep2, inner = rest.partition("=")
    if sep and sep2 and hashed and first and inner[:1] in ("=", "+", "-") and len(inner) > 1:
        return hashed, first, inner
    return None


def is_srs_address(address: str) -> bool:
    """Whether ``address``'s local part is an SRS0 or SRS1 one (any case)."""
    return _is_srs(address.rpartition("@")[0]) is not None


@dataclass(frozen=True)
class Srs:
    """Rewrites with ``keys[0]`` on ``domain``; any of ``keys`` verifies
    (old keys kept during a rotation)."""

    domain: str
    keys: tuple[bytes, ...]
    max_age_days: int = 21

    def _hash(self, key: bytes, *fields: str) -> str:
        data = "".join(fields).lower().encode("utf-8", "surrogateescape")
        digest = hmac.new(key, data, hashlib.sha1).digest()
        return base64.b64encode(digest).decode()[:HASH_LENGTH]

    def _valid_hash(self, given: str, *fields: str) -> bool:
        wanted = given.lower().encode()
        return any(
            hmac.compare_digest(self._hash(key, *fields).lower().encode(), wanted)
            for key in self.keys
        )

    @staticmethod
    def _stamp(now: float) -> str:
        day = int(now // DAY_SECONDS) % TIME_SLOTS
        return BASE32[day >> 5] + BASE32[day & 31]

    def _stamp_age(self, stamp: str, now: float) -> int | None:
        """Days since ``stamp`` was issued, or None if it is no stamp."""
        stamp = stamp.upper()
        if len(stamp) != 2 or any(c not in BASE32 for c in stamp):
            return None
        then = (BASE32.index(stamp[0]) << 5) | BASE32.index(stamp[1])
        return (int(now // DAY_SECONDS) - then) % TIME_SLOTS

    def forward(self, sender: str, now: float | None = None) -> str:
        """The reverse-path for a forwarded copy of mail from ``sender``."""
        now = time.time() if now is None else now
        local, _, domain = sender.rpartition("@")
        tag = _is_srs(local)
        if tag == "SRS0":
            # Keep the first forwarder: SRS1=HHHH=domain==HHHH=TT=... .
            rest = local[4:]  # the separator and everything after it
            hashed = self._hash(self.keys[0], domain, rest)
            return f"SRS1={hashed}={domain}={rest}@{self.domain}"
        if tag == "SRS1" and (split := _split_srs1(local)) is not None:
            _old_hash, first, inner = split  # the last forwarder's hash is replaced
            hashed = self._hash(self.keys[0], first, inner)
            return f"SRS1={hashed}={first}={inner}@{self.domain}"
        stamp = self._stamp(now)
        hashed = self._hash(self.keys[0], stamp, domain, local)
        return f"SRS0={hashed}={stamp}={domain}={local}@{self.domain}"

    def reverse(self, address: str, now: float | None = None) -> str | None:
        """The address a bounce to ``address`` goes to; None if ``address``
        is no SRS address; SrsError if it is one we cannot have made."""
        now = time.time() if now is None else now
        local, _, _domain = address.rpartition("@")
        tag = _is_srs(local)
        if tag is None:
            return None
        if tag == "SRS0":
            parts = local[5:].split("=", 3)
            if len(parts) != 4 or not all(parts[:3]) or not parts[3]:
                raise SrsError("malformed SRS0 address")
            hashed, stamp, domain, orig_local = parts
            if not self._valid_hash(hashed, stamp, domain, orig_local):
                raise SrsError("SRS0 address with a wrong hash")
            age = self._stamp_age(stamp, now)
            if age is None or age > self.max_age_days:
                raise SrsError("SRS0 address too old")
            return f"{orig_local}@{domain}"
        split = _split_srs1(local)
        if split is None:
            raise SrsError("malformed SRS1 address")
        hashed, first, inner = split
        if not self._valid_hash(hashed, first, inner):
            raise SrsError("SRS1 address with a wrong hash")
        return f"SRS0{inner}@{first}"


# The site's SRS secret as stored in the directory, by directory object.
_stored: weakref.WeakKeyDictionary[object, bytes] = weakref.WeakKeyDictionary()
# The site's first local domain (SRS's own without ``srs.domain``), by
# directory object: (monotonic expiry, name).
_primary: weakref.WeakKeyDictionary[object, tuple[float, str | None]] = weakref.WeakKeyDictionary()
PRIMARY_TTL = 60.0


async def _site_secret(storage: Storage) -> bytes:
    """The secret every instance of the site shares (the directory's
    ``shared_secrets``, made by the first instance that needs it), so a
    bounce is reversed by whichever host receives it."""
    directory = storage.directory
    key = _stored.get(directory)
    if key is None:
        key = await directory.shared_secret(SECRET_NAME, secrets.token_bytes(32))
        _stored[directory] = key
    return key


async def _primary_domain(storage: Storage) -> str | None:
    """The site's first local domain, read from the directory at most every
    :data:`PRIMARY_TTL` seconds per directory (it is asked per forwarded
    message and per SRS bounce; a new first domain is rare)."""
    from delivery.submit import primary_domain  # submit imports this module

    directory = storage.directory
    now = time.monotonic()
    known = _primary.get(directory)
    if known is not None and known[0] > now:
        return known[1]
    domain = await primary_domain(storage)
    _primary[directory] = (now + PRIMARY_TTL, domain)
    return domain


async def srs_of(settings: Settings, storage: Storage) -> Srs | None:
    """The site's SRS codec (``[srs]`` settings), or None when it is off.
    Keys: ``srs.secrets`` if set (the first signs; keep an old one after it
    while addresses made with it may still bounce), else the site's stored
    secret. Without ``srs.domain``, the first local domain added (the one
    whose SPF record names this host's outbound addresses); None when there
    is no local domain yet."""
    conf = settings.srs
    if not conf.enabled:
        return None
    domain = conf.domain or await _primary_domain(storage)
    if domain is None:
        return None
    keys = tuple(s.encode() for s in conf.secrets) or (await _site_secret(storage),)
    return Srs(domain.lower(), keys, conf.max_age_days)


__all__ = ["Srs", "SrsError", "is_srs_address", "srs_of"]
