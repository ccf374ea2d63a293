"""MTA-STS (RFC 8461): the TXT record, the policy file, its fetch and cache.

Contract:

* :func:`parse_txt` and :func:`parse_policy` are pure and linear in their
  input; they raise :class:`PolicyError` for anything RFC 8461 sections 3.1
  and 3.2 do not allow (a policy file over :data:`MAX_POLICY_OCTETS` too).
* :func:`mx_matches` is the section 4.1 host name match.
* :func:`fetch_policy` fetches ``https://mta-sts.<domain>/.well-known/
  mta-sts.txt`` under the section 3.3 rules (PKIX-valid certificate for that
  name, no redirects, 200 only, at most 64 KiB, one overall time limit;
  ``text/plain`` per section 3.2) and raises :class:`PolicyError` on any
  failure.
* :class:`StsCache` answers "which policy holds for this domain now"
  (section 5.1): it looks the TXT record up, fetches a new policy only when
  its id differs from the cached one, keeps the cached policy until its
  max_age runs out when the TXT record or the fetch fails, and keeps
  policies on disk (one JSON file a domain under its directory) so a
  restart does not forget them. It never raises for DNS or HTTP trouble.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("mtad.outbound")

# RFC 8461 section 3.3: senders MAY limit the size of the response body; the
# suggested maximum policy size is 64 kilobytes.
MAX_POLICY_OCTETS = 64 * 1024
# Section 3.2: max_age is at most 31557600 (about one year).
MAX_AGE_LIMIT = 31_557_600
# Section 3.3: senders MAY impose a timeout, one minute suggested; ours is
# shorter, it holds a delivery.
FETCH_TIMEOUT_SECONDS = 30.0
# After a failed fetch, the same domain's policy is not fetched again for
# this long (each try could hold a delivery for FETCH_TIMEOUT_SECONDS).
FETCH_BACKOFF_SECONDS = 300.0
# How long a domain found without a policy on disk is not looked up there
# again (issue #23: most domains have none, and the lookup was a thread hop
# per delivery). Another process's newly stored policy is seen this much later.
DISK_RECHECK_SECONDS = 1.0
MAX_ABSENT = 100_000  # domains remembered without a policy on disk (bounds memory)
MAX_HEADER_OCTETS = 16 * 1024
MAX_HEADER_LINES = 100
POLICY_PATH = "/.well-known/mta-sts.txt"
MODES = ("enforce", "testing", "none")

# Section 3.1: sts-id = 1*32(ALPHA / DIGIT); field names 1*32(ALPHA/DIGIT/"_"/"-"/".").
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_TXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# Section 3.2: sts-policy-mx-value = ["*."] Domain (RFC 5321 section 4.1.2).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})+\.?")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_FIELD_VALUE_BAD = re.compile(r"[^\x20-\x7e\x80-\U0010ffff]")


class PolicyError(Exception):
    """A TXT record or policy that RFC 8461 says to ignore, or a failed fetch."""


@dataclass(frozen=True)
class StsPolicy:
    """One domain's policy (section 3.2) with the id of the TXT record it
    was fetched for and when (seconds since the epoch)."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    policy_id: str = ""
    fetched: float = 0.0

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age

    def allows(self, host: str) -> bool:
        """Section 4.1: ``host`` matches one of the policy's mx patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the domain's ``_mta-sts`` TXT records, or None when
    it publishes none (section 3.1: records not starting with ``v=STSv1``
    are discarded; anything but exactly one left means no policy)."""
    candidates = [r for r in records if r.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    try:
        return txt_id(candidates[0])
    except PolicyError as exc:
        log.info("MTA-STS TXT record ignored: %s", exc)
        return None


def txt_id(record: str) -> str:
    """The ``id`` of one ``v=STSv1; id=...;`` record (section 3.1 ABNF)."""
    if len(record) > 4096:
        raise PolicyError("TXT record too long")
    fields = [f.strip(" \t") for f in record.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # the optional final ";"
    if not fields or fields[0] != "v=STSv1":
        raise PolicyError("TXT record does not start with v=STSv1")
    found: str | None = None
    for field in fields[1:]:
        name, sep, value = field.partition("=")
        if not sep or not _FIELD_NAME.fullmatch(name) or not _TXT_VALUE.fullmatch(value):
            raise PolicyError(f"malformed TXT field {field[:40]!r}")
        if name == "id" and found is None:
            if not _TXT_ID.fullmatch(value):
                raise PolicyError(f"malformed id {value[:40]!r}")
            found = value
    if found is None:
        raise PolicyError("TXT record without id")
    return found


def parse_policy(text: str | bytes) -> StsPolicy:
    """A policy file (section 3.2): ``key: value`` lines, LF or CRLF.

    version must be STSv1, mode one of enforce/testing/none, max_age 0 to
    31557600, mx one or more patterns (may be absent only in mode none).
    Unknown fields are ignored; of a repeated field other than mx, the first
    counts. Anything else raises :class:`PolicyError`."""
    if len(text) > MAX_POLICY_OCTETS:
        raise PolicyError(f"policy over {MAX_POLICY_OCTETS} octets")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError("policy is not UTF-8") from exc
    fields: dict[str, str] = {}
    mx: list[str] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # a final line break
    for number, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        name, sep, value = line.partition(":")
        name = name.rstrip(" \t")
        value = value.strip(" \t")
        if not sep or not _FIELD_NAME.fullmatch(name) or _FIELD_VALUE_BAD.search(value):
            raise PolicyError(f"line {number}: not a 'key: value' field")
        if name == "mx":
            if not _MX_PATTERN.fullmatch(value) or len(value) > 255:
                raise PolicyError(f"line {number}: bad mx pattern {value[:60]!r}")
            mx.append(value.rstrip(".").lower())
        else:
            fields.setdefault(name, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(age) or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {age[:20]!r} is not 0 to {MAX_AGE_LIMIT}")
    if not mx and mode != "none":
        raise PolicyError("no mx in an enforce or testing policy")
    return StsPolicy(mode, tuple(mx), int(age))


def mx_matches(pattern: str, host: str) -> bool:
    """Section 4.1: ``host`` matches ``pattern`` case-insensitively; a
    ``*.`` pattern stands for exactly one leftmost label
    (``*.example.com`` matches ``mx.example.com``, not ``example.com`` nor
    ``a.b.example.com``)."""
    pattern = pattern.rstrip(".").lower()
    host = host.rstrip(".").lower()
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


# -- fetching (section 3.3) ------------------------------------------------


class _Addresses(Protocol):
    async def addresses(self, host: str) -> list[str]: ...


async def fetch_policy(
    resolver: _Addresses,
    domain: str,
    context: ssl.SSLContext,
    *,
    port: int = 443,
    timeout: float = FETCH_TIMEOUT_SECONDS,
) -> StsPolicy:
    """GET the policy of ``domain`` (section 3.3) and parse it; PolicyError
    on any failure, within ``timeout`` seconds altogether."""
    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(timeout):
            return parse_policy(await _get(resolver, host, context, port))
    except TimeoutError as exc:
        raise PolicyError(f"{host}: no policy within {timeout:g}s") from exc


async def _get(resolver: _Addresses, host: str, context: ssl.SSLContext, port: int) -> bytes:
    from mtad.dns import DnsTemporaryError

    try:
        addresses = await resolver.addresses(host)
    except DnsTemporaryError as exc:
        raise PolicyError(f"{host}: {exc}") from exc
    if not addresses:
        raise PolicyError(f"{host} has no address")
    last: Exception | None = None
    for address in addresses:
        try:
            # server_hostname: SNI (section 7.1) and the PKIX name check (section 3.3).
            reader, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=host, limit=MAX_HEADER_OCTETS
            )
        except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
            last = exc
            continue
        try:
            request = (
                f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {host}\r\nAccept: text/plain\r\n"
                "User-Agent: shardmail-mta-sts\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii"))
            await writer.drain()
            return await _read_response(reader, host)
        except (OSError, ssl.SSLError, ValueError, asyncio.IncompleteReadError) as exc:
            raise PolicyError(f"{host}: {exc!r}") from exc
        finally:
            writer.close()
    raise PolicyError(f"{host}: cannot connect: {last}")


async def _read_response(reader: asyncio.StreamReader, host: str) -> bytes:
    status = (await reader.readline()).decode("latin-1").rstrip("\r\n")
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise PolicyError(f"{host}: not an HTTP response: {status[:60]!r}")
    code = int(parts[1])
    if 300 <= code < 400:
        raise PolicyError(f"{host}: redirect {code} (RFC 8461 section 3.3: not followed)")
    if code != 200:
        raise PolicyError(f"{host}: HTTP {code}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        if not line:
            break
        name, _sep, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    else:
        raise PolicyError(f"{host}: too many header lines")
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "text/plain":
        raise PolicyError(f"{host}: Content-Type {media!r} is not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, host)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > MAX_POLICY_OCTETS:
            raise PolicyError(f"{host}: policy of {length[:20]} octets, over 64 KiB")
        return await reader.readexactly(int(length))
    body = await reader.read(MAX_POLICY_OCTETS + 1)
    while len(body) <= MAX_POLICY_OCTETS:
        more = await reader.read(MAX_POLICY_OCTETS + 1 - len(body))
        if not more:
            return body
        body += more
    raise PolicyError(f"{host}: policy over 64 KiB")


async def _read_chunked(reader: asyncio.StreamReader, host: str) -> bytes:
    body = bytearray()
    while True:
        size_line = (await reader.readline()).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError as exc:
            raise PolicyError(f"{host}: bad chunk size") from exc
        if size == 0:
            return bytes(body)
        if len(body) + size > MAX_POLICY_OCTETS:
            raise PolicyError(f"{host}: policy over 64 KiB")
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF


# -- the cache (section 5.1) -----------------------------------------------


class _Lookups(_Addresses, Protocol):
    async def txt(self, name: str) -> list[str]: ...


_SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,252}")


class StsCache:
    """Policies by domain, in memory and (with ``directory``) on disk."""

    def __init__(
        self,
        context: ssl.SSLContext,
        directory: Path | None = None,
        *,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT_SECONDS,
        clock=time.time,
    ) -> None:
        self.context = context
        self.directory = directory
        self.port = port
        self.timeout = timeout
        self.clock = clock
        self._policies: dict[str, StsPolicy] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.last_error: dict[str, str] = {}  # domain -> why its last fetch failed
        self._retry_after: dict[str, float] = {}  # domain -> no fetch before this time
        self._absent: dict[str, float] = {}  # domain -> none on disk; ask it again after

    async def policy(self, resolver: _Lookups, domain: str) -> StsPolicy | None:
        """The policy in force for ``domain`` (section 5.1), None if none."""
        from mtad.dns import DnsTemporaryError

        domain = domain.rstrip(".").lower()
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:
            now = self.clock()
            cached = await self._cached(domain, now)
            try:
                policy_id = parse_txt(await resolver.txt(f"_mta-sts.{domain}"))
            except DnsTemporaryError as exc:
                log.info("MTA-STS TXT of %s: %s; cached policy used", domain, exc)
                return cached
            if policy_id is None or (cached is not None and cached.policy_id == policy_id):
                # Section 5.1: no (valid) TXT record: a cached policy holds
                # until it expires; the same id: the cached policy is current.
                return cached
            if now < self._retry_after.get(domain, 0.0):
                return cached  # fetched in vain a moment ago
            try:
                fetched = await fetch_policy(
                    resolver, domain, self.context, port=self.port, timeout=self.timeout
                )
            except PolicyError as exc:
                # Section 3.3: a failed fetch keeps the cached policy in force.
                log.warning("MTA-STS policy of %s not fetched: %s", domain, exc)
                self.last_error[domain] = str(exc)
                self._retry_after[domain] = now + FETCH_BACKOFF_SECONDS
                return cached
            self.last_error.pop(domain, None)
            self._retry_after.pop(domain, None)
            policy = StsPolicy(fetched.mode, fetched.mx, fetched.max_age, policy_id, now)
            self._policies[domain] = policy
            await self._store(domain, policy)
            return policy

    async def _cached(self, domain: str, now: float) -> StsPolicy | None:
        """The policy known for ``domain``: in memory, else on disk (stored
        by an earlier run or another process of this site), unexpired. A
        domain found without one on disk is not looked up there again for
        ``DISK_RECHECK_SECONDS``."""
        policy = self._policies.get(domain)
        # Known absent until then (a wall clock set back asks the disk again).
        until = self._absent.get(domain, 0.0)
        known_absent = now < until <= now + DISK_RECHECK_SECONDS
        if (
            policy is None
            and not known_absent
            and self.directory is not None
            and _SAFE_NAME.fullmatch(domain)
        ):
            policy = await asyncio.to_thread(self._read, self.directory / f"{domain}.json")
            if policy is not None:
                self._policies[domain] = policy
                self._absent.pop(domain, None)
            else:
                if len(self._absent) >= MAX_ABSENT:
                    self._absent.clear()
                self._absent[domain] = now + DISK_RECHECK_SECONDS
        if policy is not None and policy.expired(now):
            return None
        return policy

    @staticmethod
    def _read(path: Path) -> StsPolicy | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return StsPolicy(
                str(data["mode"]),
                tuple(str(m) for m in data["mx"]),
                int(data["max_age"]),
                str(data["policy_id"]),
                float(data["fetched"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("MTA-STS cache file %s unreadable: %s", path, exc)
            return None

    async def _store(self, domain: str, policy: StsPolicy) -> None:
        if self.directory is None or not _SAFE_NAME.fullmatch(domain):
            return
        directory = self.directory

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{domain}.json"
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(asdict(policy)), encoding="utf-8")
            os.replace(tmp, path)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            log.warning("MTA-STS policy of %s not cached on disk: %s", domain, exc)
