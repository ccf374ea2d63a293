"""A small DMARC evaluation (RFC 7489), pure except for :func:`evaluate`.

What it does: find the policy record (``_dmarc.<From domain>``, then
``_dmarc.<organisational domain>``, section 6.6.3), check identifier
alignment of the SPF-authenticated MAIL FROM domain and of each passing
DKIM ``d=`` with the RFC5322.From domain, relaxed or strict (section 3.1),
and name the policy to apply (``p=`` or, for a subdomain found through the
organisational record, ``sp=``; ``pct=`` sampling per section 6.6.4).

Public suffix approximation (section 3.2 wants the Public Suffix List; we
do not ship it): the organisational domain is the last two labels, or the
last three when the last two form one of the common two-label public
suffixes in :data:`TWO_LABEL_SUFFIXES` (``co.uk``, ``com.au``...). This is
right for most senders; a domain under a private or unlisted suffix may get
a too-short organisational domain, which makes relaxed alignment more
lenient, never stricter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from mtad.dns import DnsTemporaryError, Resolver

TWO_LABEL_SUFFIXES = frozenset(
    f"{second}.{tld}"
    for tld, seconds in {
        "uk": ("co", "org", "ac", "gov", "ltd", "plc", "me", "net", "nhs", "sch"),
        "au": ("com", "net", "org", "edu", "gov", "asn", "id"),
        "nz": ("co", "org", "net", "ac", "govt", "geek", "school"),
        "jp": ("co", "ne", "or", "ac", "go", "ad", "ed", "gr", "lg"),
        "za": ("co", "org", "net", "gov", "ac", "web"),
        "br": ("com", "net", "org", "gov", "edu"),
        "cn": ("com", "net", "org", "gov", "edu", "ac"),
        "in": ("co", "net", "org", "gov", "ac", "firm", "gen", "ind"),
        "kr": ("co", "or", "ne", "go", "ac", "re"),
        "il": ("co", "org", "net", "ac", "gov"),
        "mx": ("com", "org", "net", "gob", "edu"),
        "tr": ("com", "org", "net", "gov", "edu"),
        "ar": ("com", "org", "net", "gob", "edu"),
        "hk": ("com", "org", "net", "gov", "edu"),
        "sg": ("com", "org", "net", "gov", "edu"),
        "tw": ("com", "org", "net", "gov", "edu"),
    }.items()
    for second in seconds
)

POLICIES = ("none", "quarantine", "reject")


def organizational_domain(domain: str) -> str:
    """RFC 7489 section 3.2, with the approximation described above."""
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) <= 2:
        return ".".join(labels)
    if ".".join(labels[-2:]) in TWO_LABEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Section 3.1.1/3.1.2: strict ``s`` wants equal domains, relaxed ``r``
    equal organisational domains."""
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


@dataclass(frozen=True)
class DmarcRecord:
    """Section 6.3 tags we act on (``ruf`` failure reports are not sent;
    ``rua`` aggregate reports are, by mtad/dmarcsend.py)."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: tuple[str, ...] = ()  # section 6.4: the mailto: URIs, "!size" suffix removed


def parse_record(text: str) -> DmarcRecord | None:
    """Parse a TXT record; None if it is not a usable DMARC record.

    Section 6.6.3: a record must start with ``v=DMARC1``; one whose ``p=``
    is missing or invalid is ignored (also when it has ``rua=``, which the
    section would read as ``p=none``: such a domain gets no reports).
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or not text.strip().startswith("v"):
        return None
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        return None
    sp = tags.get("sp", "").lower()
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return DmarcRecord(
        p=p,
        sp=sp if sp in POLICIES else p,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=pct,
        rua=_mailto_uris(tags.get("rua", "")),
    )


def _mailto_uris(value: str) -> tuple[str, ...]:
    """Section 6.4 (URI list, comma separated) and 6.2 (a ``!size`` limit
    may follow): the ``mailto:`` addresses; other schemes are skipped."""
    found: list[str] = []
    for uri in value.split(","):
        uri = uri.strip().split("!")[0]
        if uri.lower().startswith("mailto:") and "@" in uri:
            found.append(uri[len("mailto:") :])
    return tuple(found)


@dataclass(frozen=True)
class DmarcResult:
    """``result``: pass, fail, none (no policy), temperror or permerror
    (RFC 8601 section 2.7.5 plus RFC 7489 section 11.2). ``disposition`` is
    what to do: none, quarantine or reject (already sampled by pct)."""

    result: str
    from_domain: str
    policy: str = "none"
    disposition: str = "none"
    # For aggregate reports (section 7.2): the record and where it was found
    # (the From domain or its organisational domain), and the aligned results.
    record: DmarcRecord | None = None
    policy_domain: str = ""
    dkim_aligned: bool = False
    spf_aligned: bool = False

    def header_value(self) -> str:
        if self.result in ("none", "permerror", "temperror") and not self.from_domain:
            return f"dmarc={self.result}"
        return f"dmarc={self.result} (p={self.policy} dis={self.disposition}) " + (
            f"header.from={self.from_domain}"
        )


@dataclass(frozen=True)
class DkimPass:
    """A DKIM signature that verified, by its ``d=`` domain."""

    domain: str


def decide(
    record: DmarcRecord,
    found_at_org: bool,
    from_domain: str,
    spf_result: str,
    spf_domain: str,
    dkim_passes: Sequence[str],
    sample: float | None = None,
) -> DmarcResult:
    """Section 6.6.2 and 6.6.4 given a record: pure, for unit tests."""
    policy = (
        record.sp
        if found_at_org and from_domain != organizational_domain(from_domain)
        else record.p
    )
    dkim_ok = any(aligned(d, from_domain, record.adkim) for d in dkim_passes)
    spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain, record.aspf)
    found = organizational_domain(from_domain) if found_at_org else from_domain
    seen = {
        "record": record,
        "policy_domain": found,
        "dkim_aligned": dkim_ok,
        "spf_aligned": spf_ok,
    }
    if dkim_ok or spf_ok:
        return DmarcResult("pass", from_domain, policy, "none", **seen)
    disposition = policy
    roll = random.random() * 100 if sample is None else sample
    if record.pct < 100 and roll >= record.pct:
        # Section 6.6.4: outside the sample, apply the next policy down.
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DmarcResult("fail", from_domain, policy, disposition, **seen)


async def _lookup(resolver: Resolver, domain: str) -> DmarcRecord | None:
    records = [r for r in await resolver.txt(f"_dmarc.{domain}") if r.startswith("v=DMARC1")]
    if len(records) != 1:  # section 6.6.3: none, or several, means no policy
        return None
    return parse_record(records[0])


async def evaluate(
    resolver: Resolver,
    from_domain: str | None,
    spf_result: str,
    spf_domain: str,
    dkim_passes: Sequence[str],
) -> DmarcResult:
    """Evaluate DMARC for a message whose single RFC5322.From domain is
    ``from_domain`` (None: zero or several From addresses -> permerror)."""
    if not from_domain:
        return DmarcResult("permerror", "")
    try:
        record = await _lookup(resolver, from_domain)
        found_at_org = False
        org = organizational_domain(from_domain)
        if record is None and org != from_domain:
            record = await _lookup(resolver, org)
            found_at_org = True
    except DnsTemporaryError:
        return DmarcResult("temperror", from_domain)
    if record is None:
        return DmarcResult("none", from_domain)
    return decide(record, found_at_org, from_domain, spf_result, spf_domain, dkim_passes)
