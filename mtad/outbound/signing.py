"""DKIM signing of outbound mail (RFC 6376), one key per sending domain.

Keys live in the directory (``Directory.dkim_key``, a secret of the site
that every instance shares, issue #19); key files that older versions kept
in ``settings.queue.dkim_key_dir`` as ``<domain>.<selector>.key`` (PEM,
RSA) are still used for a domain the directory has no key for. Contract:
:meth:`DkimSigner.sign` returns the message with a DKIM-Signature field
prepended when a key exists for the domain of the From header (aligned
with it for DMARC, RFC 7489 section 3.1.1), else for the envelope sender's
domain; unchanged when there is none; a directory that
cannot be read raises its TEMPORARY error (the delivery is retried, never
sent unsigned by mistake). Signing is CPU work (dkimpy's canonicalization
and hashing, RSA by OpenSSL: about 2 ms for 5 KB) and runs in the content
pool's worker processes (``storage.contentpool``), off the event loop's
GIL, under a time limit that grows with the message; a worker that dies or
runs past it raises :class:`SigningUnavailable`, a TEMPORARY error too:
retried later, never sent unsigned, never bounced.
:func:`new_key` makes a key pair for ``mailctl dkim generate`` and returns
the TXT record to publish.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import dkim
import dkim.crypto

from delivery.headers import from_domains
from storage.contentpool import ContentTimeout, content_pool
from storage.errors import ErrorKind, StorageError

log = logging.getLogger("mtad.outbound.dkim")

# RFC 6376 section 5.4.1: fields a verifier expects signed, and ones worth
# protecting. Listed fields that are absent are signed as absent (no later
# addition).
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)
# RFC 8301 section 3.2: RSA keys of at least 1024 bits, 2048 recommended.
DEFAULT_KEY_BITS = 2048
# RFC 1035 section 3.3: one TXT character-string holds at most 255 octets.
TXT_CHUNK = 255
# How long a signer trusts the directory's answer about a domain's key: a
# key added with mailctl on any host signs mail from at most this later.
KEY_CACHE_SECONDS = 30.0
# A key file found is used this long before its folder is looked at again
# (a stat, in a thread: a thread hop per relayed message otherwise).
FILE_KEY_RECHECK_SECONDS = 1.0
# A signing job's time limit is the content pool's plus this per MB of
# message: hashing runs at about 30 ms per MB here (25 MB, the default
# size limit, in under a second), so only a stuck worker reaches it, not
# a large message on a busy host (which would be retried forever).
SIGN_SECONDS_PER_MB = 1.0


class SigningUnavailable(StorageError):
    """The signing worker died or ran past its time limit: a TEMPORARY
    error, so the queue retries the delivery later (the message is not
    sent unsigned, and not bounced)."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorKind.TEMPORARY, f"DKIM signing unavailable: {reason}")


class KeyDirectory(Protocol):
    """Where the site's keys live (``storage.sql.directory.SqlDirectory``)."""

    async def dkim_key(self, domain: str, selector: str) -> tuple[str, bytes] | None: ...


def key_path(key_dir: Path | str, domain: str, selector: str) -> Path:
    return Path(key_dir) / f"{domain.lower()}.{selector}.key"


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_pem: bytes


def find_key(key_dir: Path | str, domain: str, selector: str) -> DkimKey | None:
    """The key for ``domain``: ``<domain>.<selector>.key`` if present, else
    the first ``<domain>.*.key`` (a selector rotated by hand). Blocking."""
    domain = domain.lower()
    path = key_path(key_dir, domain, selector)
    if not path.is_file():
        candidates = sorted(Path(key_dir).glob(f"{domain}.*.key")) if Path(key_dir).is_dir() else []
        candidates = [c for c in candidates if c.name.count(".") >= domain.count(".") + 2]
        if not candidates:
            return None
        path = candidates[0]
        selector = path.name[len(domain) + 1 : -len(".key")]
    return DkimKey(domain, selector, path.read_bytes())


# dkimpy computes RSA with Python's pow() (dkim.crypto.rsa_decrypt): about
# 80% of a 5 KB message's signing. RSASSA-PKCS1-v1_5 is deterministic
# (RFC 8017 section 8.2.1), so OpenSSL's gives the same bytes for a
# fraction of the CPU; dkimpy's own stays for whatever OpenSSL refuses.
_DKIMPY_RSA_SIGN = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_OPENSSL_KEYS: dict[int, object] = {}  # by modulus; a site signs with few keys
_OPENSSL_KEYS_MAX = 256


def _openssl_key(private_key: dict[str, int]):
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = _OPENSSL_KEYS.get(private_key["modulus"])
    if key is None:
        public = rsa.RSAPublicNumbers(private_key["publicExponent"], private_key["modulus"])
        key = rsa.RSAPrivateNumbers(
            p=private_key["prime1"],
            q=private_key["prime2"],
            d=private_key["privateExponent"],
            dmp1=private_key["exponent1"],
            dmq1=private_key["exponent2"],
            iqmp=private_key["coefficient"],  # q^-1 mod p in RFC 8017 A.1.2 too
            public_numbers=public,
        ).private_key()
        if len(_OPENSSL_KEYS) >= _OPENSSL_KEYS_MAX:
            _OPENSSL_KEYS.clear()
        _OPENSSL_KEYS[private_key["modulus"]] = key
    return key


def rsassa_pkcs1_v1_5_sign(digest, private_key: dict[str, int]) -> bytes:
    """``dkim.crypto.RSASSA_PKCS1_v1_5_sign`` by OpenSSL: the same
    signature of ``digest`` (a finished hash object) with dkimpy's parsed
    ``private_key``; dkimpy's own for a hash or key OpenSSL refuses (its
    errors, such as a key too short for the digest, stay dkimpy's)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    algorithm = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}.get(digest.name.lower())
    if algorithm is None:
        return _DKIMPY_RSA_SIGN(digest, private_key)
    try:
        key = _openssl_key(private_key)
        return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))
    except ValueError:
        return _DKIMPY_RSA_SIGN(digest, private_key)


# dkim.sign and dkim.arc_sign call the name dkimpy imported into its package.
if getattr(dkim, "RSASSA_PKCS1_v1_5_sign", None) is _DKIMPY_RSA_SIGN:
    dkim.RSASSA_PKCS1_v1_5_sign = rsassa_pkcs1_v1_5_sign


def from_domain(message: bytes) -> str | None:
    """The domain of the first From address, lower-cased."""
    domains = [d for d in from_domains(message) if d]
    return domains[0] if domains else None


def sign_sync(message: bytes, key: DkimKey) -> bytes:
    """The message with a DKIM-Signature prepended (relaxed/relaxed, rsa-sha256)."""
    signature = dkim.sign(
        message,
        key.selector.encode(),
        key.domain.encode(),
        key.private_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=list(SIGNED_HEADERS),
        linesep=b"\r\n",
    )
    return signature + message


class DkimSigner:
    """Signs with the ``directory``'s keys, else the key files of
    ``key_dir``; keys are cached by domain."""

    def __init__(
        self, key_dir: Path | str, selector: str, directory: KeyDirectory | None = None
    ) -> None:
        self.key_dir = Path(key_dir)
        self.selector = selector
        self._directory = directory
        self._cache: dict[str, tuple[float, DkimKey | None]] = {}
        self._stored: dict[str, tuple[float, DkimKey | None]] = {}  # monotonic expiry
        self._found: dict[str, tuple[float, DkimKey]] = {}  # key files, monotonic expiry

    async def _stored_key(self, domain: str) -> DkimKey | None:
        if self._directory is None:
            return None
        now = time.monotonic()
        hit = self._stored.get(domain)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await self._directory.dkim_key(domain, self.selector)
        key = None if found is None else DkimKey(domain, found[0], found[1])
        self._stored[domain] = (now + KEY_CACHE_SECONDS, key)
        return key

    async def _file_key(self, domain: str) -> DkimKey | None:
        """``domain``'s key file: one found lately, else looked up in a thread."""
        now = time.monotonic()
        hit = self._found.get(domain)
        if hit is not None and hit[0] > now:
            return hit[1]
        key = await asyncio.to_thread(self._key, domain)
        if key is not None:
            self._found[domain] = (now + FILE_KEY_RECHECK_SECONDS, key)
        return key

    def _key(self, domain: str) -> DkimKey | None:
        # Re-read when the folder changes (a key added by mailctl).
        try:
            stamp = self.key_dir.stat().st_mtime
        except FileNotFoundError:
            return None
        cached = self._cache.get(domain)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        key = find_key(self.key_dir, domain, self.selector)
        self._cache[domain] = (stamp, key)
        return key

    def sign_for(self, message: bytes, sender: str) -> bytes:
        """Blocking: sign ``message`` as its From domain or ``sender``'s
        domain, with the key files only."""
        for domain in _signing_domains(message, sender):
            key = self._key(domain)
            if key is not None:
                return _sign_or_keep(message, key)
        return message

    async def sign(self, message: bytes, sender: str, arc_authserv_id: str = "") -> bytes:
        """``message`` signed as its From domain or ``sender``'s domain,
        with the directory's key for it, else its key file. With
        ``arc_authserv_id`` (mail we forward), also sealed with an ARC set
        (RFC 8617 section 4) by the same key, carrying the
        Authentication-Results our MX added under that authserv-id."""
        for domain in _signing_domains(message, sender):
            key = await self._stored_key(domain) or await self._file_key(domain)
            if key is not None:
                return await sign_in_pool(message, key, arc_authserv_id)
        return message


def _signing_domains(message: bytes, sender: str) -> list[str]:
    """The From domain (aligned for DMARC), then the envelope sender's."""
    domains = [from_domain(message), sender.rpartition("@")[2].lower() if sender else None]
    return [d for d in domains if d]


def arc_seal_sync(message: bytes, key: DkimKey, authserv_id: str) -> bytes:
    """The message with the next ARC set prepended (RFC 8617 section 5.1:
    ARC-Authentication-Results from our Authentication-Results, an
    ARC-Message-Signature and an ARC-Seal, relaxed/relaxed, rsa-sha256)."""
    fields = dkim.arc_sign(
        message,
        key.selector.encode(),
        key.domain.encode(),
        key.private_pem,
        authserv_id.encode(),
        include_headers=list(SIGNED_HEADERS),
        linesep=b"\r\n",
    )
    return b"".join(fields) + message


def signature_fields(message: bytes, key: DkimKey, arc_authserv_id: str = "") -> tuple[bytes, str]:
    """Blocking and pure (it runs in a content worker): the fields to
    prepend to ``message``: its DKIM-Signature, then, with
    ``arc_authserv_id``, the ARC set sealing the signed message; and why a
    step failed ("" when none did; the fields are then as far as it got).
    Only the fields travel back from the worker, not the message."""
    try:
        signed = sign_sync(message, key)
    except (dkim.DKIMException, ValueError) as exc:
        return b"", f"DKIM signing as {key.domain} failed: {exc}"
    note = ""
    if arc_authserv_id:
        try:
            signed = arc_seal_sync(signed, key, arc_authserv_id)
        except (dkim.DKIMException, ValueError) as exc:
            note = f"ARC sealing as {key.domain} failed: {exc}"
    return signed[: len(signed) - len(message)], note


def _sign_or_keep(message: bytes, key: DkimKey, arc_authserv_id: str = "") -> bytes:
    """Blocking: signed with ``key`` (and ARC-sealed with it if
    ``arc_authserv_id``), or as far as it got (logged) if a step fails."""
    fields, note = signature_fields(message, key, arc_authserv_id)
    if note:
        log.warning("%s", note)
    return fields + message


async def sign_in_pool(message: bytes, key: DkimKey, arc_authserv_id: str = "") -> bytes:
    """:func:`_sign_or_keep` in a content worker (a thread when the pool
    has none), within the pool's time limit plus
    :data:`SIGN_SECONDS_PER_MB`; :class:`SigningUnavailable` past it or
    when the worker dies."""
    pool = content_pool()
    limit = pool.time_limit + SIGN_SECONDS_PER_MB * len(message) / 1e6
    try:
        fields, note = await pool.run(
            signature_fields, message, key, arc_authserv_id, time_limit=limit
        )
    except ContentTimeout as exc:
        raise SigningUnavailable(str(exc)) from None
    if note:
        log.warning("%s", note)
    return fields + message


def txt_record_value(public_der: bytes) -> str:
    """The RFC 6376 section 3.6.1 key record: ``v=DKIM1; k=rsa; p=...``."""
    return f"v=DKIM1; k=rsa; p={base64.b64encode(public_der).decode()}"


def new_key(bits: int = DEFAULT_KEY_BITS) -> tuple[bytes, str]:
    """A new RSA key: (private PEM, PKCS#8, unencrypted; TXT record value)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, record_of(pem)


def record_of(private_pem: bytes) -> str:
    """The TXT record value publishing the public half of ``private_pem``."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return txt_record_value(der)


def generate_key(
    key_dir: Path | str, domain: str, selector: str, bits: int = DEFAULT_KEY_BITS
) -> tuple[Path, str]:
    """Creates the key file ``<domain>.<selector>.key`` an older version's
    ``mailctl dkim generate`` made (mode 0600; FileExistsError if present)
    and returns (path, TXT record value)."""
    path = key_path(key_dir, domain, selector)
    path.parent.mkdir(parents=True, exist_ok=True)
    pem, record = new_key(bits)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path, record


def zone_line(domain: str, selector: str, value: str) -> str:
    """The record as a zone file line, split into 255-octet strings."""
    chunks = [value[i : i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"
