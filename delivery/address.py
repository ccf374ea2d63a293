"""SMTP paths and ESMTP parameters (RFC 5321 section 4.1.2), parsed purely.

``parse_path("FROM:", "FROM:<a@b> SIZE=10")`` -> ``Path("a@b", {"SIZE": "10"})``.
Nothing here does I/O; the session decides what a valid path means for it
(a null reverse-path ``<>`` is fine for MAIL, never for RCPT).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field


class PathSyntaxError(ValueError):
    """The argument is not ``KEYWORD:<path> [params]``; message is safe to show."""


@dataclass(frozen=True)
class Path:
    """``address`` is ``local@domain`` (domain lower-cased, A-label form) or
    ``""`` for the null reverse-path; ``params`` maps upper-cased ESMTP
    keywords to their value (None when given without ``=``)."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def is_null(self) -> bool:
        return not self.address

    @property
    def domain(self) -> str:
        return domain_of(self.address)

    @property
    def is_ascii(self) -> bool:
        return self.address.isascii()


# RFC 6531 section 3.3 UTF8-non-ascii: any non-ASCII scalar value; surrogates
# (how aiosmtpd's surrogateescape carries invalid UTF-8 octets) are not among them.
_NON_ASCII = r"\u0080-\ud7ff\ue000-\U0010ffff"
# RFC 5321 section 4.1.2 Dot-string atoms (atext), plus UTF-8 (RFC 6531 section 3.3).
_ATOM = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_NON_ASCII}]+"
_DOT_STRING = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_QUOTED = re.compile(rf'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_NON_ASCII}]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(rf"^(?!-)[A-Za-z0-9\-{_NON_ASCII}]{{1,63}}(?<!-)$")
_PARAM_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")
# RFC 5321 section 4.1.2 esmtp-value (no "=", no controls), RFC 6531 section 3.3 adds UTF-8.
_PARAM_VALUE = re.compile(rf"^[\x21-\x3c\x3e-\x7e{_NON_ASCII}]+$")
# RFC 5321 section 4.5.3.1.1-2: local part 64 octets, domain 255 octets.
MAX_LOCAL_PART = 64
# An SRS address (delivery/srs.py) carries a whole original address in its
# local part, so bounces to one often pass 64 octets; section 4.5.3.1 asks
# servers to accept longer objects where they can, and Postfix does.
MAX_SRS_LOCAL_PART = 255
# RFC 5321 section 4.5.1: every server takes mail for this local part (any case).
POSTMASTER = "postmaster"
MAX_DOMAIN = 255


def is_postmaster(address: str) -> bool:
    """``postmaster`` alone or ``postmaster@domain``, in any case."""
    return address.rpartition("@")[0 if "@" in address else 2].lower() == POSTMASTER


def domain_of(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


def normalise_domain(domain: str) -> str:
    """Lower-case, A-label (IDNA) form; address literals are kept."""
    domain = domain.rstrip(".").lower()
    if domain.startswith("[") or domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise PathSyntaxError("invalid internationalized domain") from exc


def _require_utf8(text: str) -> None:
    """PathSyntaxError if ``text`` carries octets that were not valid UTF-8
    (surrogate-escaped by the command reader, or lone surrogates from JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PathSyntaxError("not valid UTF-8 (RFC 6531 section 3.3)") from exc


def _address_literal(domain: str) -> str:
    """RFC 5321 section 4.1.3: ``[IPv4]`` or ``[IPv6:addr]``, normalised.

    A General-address-literal needs an IANA Standardized-tag and "IPv6" is
    the only one registered, so nothing else (``[1<2]``, ``[foo:bar]``) is a
    literal we could ever route to."""
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError as exc:
        raise PathSyntaxError("invalid address literal (RFC 5321 section 4.1.3)") from exc


def _split_angle(text: str) -> tuple[str, str]:
    """``<...> rest`` -> (inside, rest); quoted-strings may hold ``>``."""
    if not text.startswith("<"):
        raise PathSyntaxError("path must be enclosed in <>")
    quoted = escaped = False
    for i, ch in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return text[1:i], text[i + 1 :]
    raise PathSyntaxError("unterminated path")


def parse_mailbox(mailbox: str) -> str:
    """Validate ``local@domain`` and return it with the domain normalised.
    Raises PathSyntaxError (never anything else) for any string."""
    _require_utf8(mailbox)
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        raise PathSyntaxError("address must be local-part@domain")
    if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
        raise PathSyntaxError("invalid local part")
    srs = local[:4].upper() in ("SRS0", "SRS1")
    if len(local.encode()) > (MAX_SRS_LOCAL_PART if srs else MAX_LOCAL_PART):
        raise PathSyntaxError("local part too long")
    if domain.startswith("[") and domain.endswith("]"):
        return f"{local}@{_address_literal(domain)}"
    labels = domain.rstrip(".").split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise PathSyntaxError("invalid domain")
    domain = normalise_domain(domain)
    if len(domain) > MAX_DOMAIN:
        raise PathSyntaxError("domain too long")
    return f"{local}@{domain}"


def parse_params(text: str) -> dict[str, str | None]:
    """RFC 5321 section 4.1.2 Mail-parameters: ``KEY[=VALUE]`` separated by spaces."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _PARAM_KEYWORD.match(key) or (eq and not _PARAM_VALUE.match(value)):
            raise PathSyntaxError(f"invalid parameter {item!r}")
        key = key.upper()
        if key in params:
            raise PathSyntaxError(f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def parse_path(keyword: str, arg: str | None, *, allow_null: bool) -> Path:
    """Parse ``FROM:<path> params`` (``keyword`` is ``"FROM:"`` or ``"TO:"``).

    Tolerates a space after the colon as most servers do; accepts and drops
    a source route (``<@a,@b:user@c>``, RFC 5321 section 4.1.1.3 and C).
    Raises PathSyntaxError (never anything else) for any string, including
    one holding surrogate-escaped invalid UTF-8.
    """
    if arg is not None:
        _require_utf8(arg)
    if arg is None or arg[: len(keyword)].upper() != keyword:
        raise PathSyntaxError(f"expected {keyword}<address>")
    inside, rest = _split_angle(arg[len(keyword) :].lstrip(" "))
    if rest and not rest.startswith(" "):
        raise PathSyntaxError("parameters must follow the path after a space")
    if inside.startswith("@"):  # source route: discard up to the colon
        _, colon, inside = inside.partition(":")
        if not colon:
            raise PathSyntaxError("invalid source route")
    params = parse_params(rest)
    if not inside:
        if not allow_null:
            raise PathSyntaxError("null path not allowed here")
        return Path("", params)
    if keyword == "TO:" and inside.lower() == POSTMASTER:
        return Path(POSTMASTER, params)  # RFC 5321 section 4.1.1.3: "<Postmaster>"
    return Path(parse_mailbox(inside), params)
