"""RFC 3461 DSN parameters: their syntax, xtext, and what they ask for.

The SMTP session checks MAIL's RET and ENVID and RCPT's NOTIFY and ORCPT
here (:func:`mail_dsn`, :func:`rcpt_dsn`: DsnParamError, a 501 5.5.4, for
anything outside RFC 3461 sections 4.1-4.4) and stores them as sent, in
``storage.sql.queue.DsnEnvelope`` / ``DsnRecipient``, so that a next hop
gets them unchanged. The notices decode them (:func:`xtext_decode`) and ask
:func:`wants` whether a recipient wants one. Every function is linear in
its input: regular expressions without nested repetition.
"""

from __future__ import annotations

import re

from storage.sql.queue import NO_DSN, DsnEnvelope, DsnRecipient

# RFC 3461 section 4: xtext = *( xchar / hexchar ); xchar is "!".."~" but
# "+" and "="; hexchar is "+" and two upper-case hexadecimal digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# RFC 3461 section 4.2: addr-type is an atom (RFC 5322 section 3.2.3 atext).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# What a decoded ENVID or ORCPT address may hold: printable US-ASCII
# (RFC 3461 section 4.4 for ENVID; the DSN fields are text, RFC 3464 2.1).
_PRINTABLE = re.compile(r"[ -~]*")

ENVID_MAX = 100  # RFC 3461 section 4.4
ORCPT_MAX = 500  # RFC 3461 section 4.2
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")  # RFC 3461 section 4.1, and NEVER alone


class DsnParamError(ValueError):
    """A DSN parameter outside RFC 3461's syntax; the message is safe to show."""


def xtext_decode(text: str) -> str:
    """The text ``text`` (xtext) stands for; DsnParamError if it is not xtext."""
    if not _XTEXT.fullmatch(text):
        raise DsnParamError("not xtext (RFC 3461 section 4): '+' must begin +XX, no '='")
    return _HEXCHAR.sub(lambda m: chr(int(m[1], 16)), text)


def xtext_encode(text: str) -> str:
    """``text`` as xtext: "+", "=" and octets outside "!".."~" as +XX."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in text
    )


def _printable(decoded: str, name: str) -> str:
    if not _PRINTABLE.fullmatch(decoded):
        raise DsnParamError(f"{name} must decode to printable US-ASCII")
    return decoded


def _bounded(params: dict[str, str | None], keyword: str, limit: int, section: str) -> str:
    """Takes ``keyword``'s value out of ``params``: present, at most ``limit``
    characters (RFC 3461 ``section``)."""
    value = params.pop(keyword)
    if not value:
        raise DsnParamError(f"{keyword} needs a value (RFC 3461 section {section})")
    if len(value) > limit:
        raise DsnParamError(f"{keyword} over {limit} characters (RFC 3461 section {section})")
    return value


def mail_dsn(params: dict[str, str | None]) -> DsnEnvelope:
    """Takes RET and ENVID out of MAIL's ``params`` (upper-cased keywords,
    None for a keyword without a value). RET is FULL or HDRS (section 4.3);
    ENVID is xtext of at most 100 characters decoding to printable ASCII
    (section 4.4)."""
    ret = envid = None
    if "RET" in params:
        ret = (params.pop("RET") or "").upper()
        if ret not in ("FULL", "HDRS"):
            raise DsnParamError("RET must be FULL or HDRS (RFC 3461 section 4.3)")
    if "ENVID" in params:
        envid = _bounded(params, "ENVID", ENVID_MAX, "4.4")
        _printable(xtext_decode(envid), "ENVID")
    return DsnEnvelope(ret, envid)


def rcpt_dsn(params: dict[str, str | None]) -> DsnRecipient:
    """Takes NOTIFY and ORCPT out of RCPT's ``params``. NOTIFY is NEVER
    alone or a comma list of SUCCESS, FAILURE, DELAY, case-blind (section
    4.1), kept upper-case in that order; ORCPT is ``addr-type;xtext``, at
    most 500 characters (section 4.2), kept as sent."""
    notify = orcpt = None
    if "NOTIFY" in params:
        words = (params.pop("NOTIFY") or "").upper().split(",")
        if words == ["NEVER"]:
            notify = "NEVER"
        elif set(words) <= set(NOTIFY_WORDS) and len(set(words)) == len(words):
            notify = ",".join(w for w in NOTIFY_WORDS if w in words)
        else:
            raise DsnParamError(
                "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY (RFC 3461 section 4.1)"
            )
    if "ORCPT" in params:
        orcpt = _bounded(params, "ORCPT", ORCPT_MAX, "4.2")
        addr_type, semicolon, address = orcpt.partition(";")
        if not semicolon or not _ATOM.fullmatch(addr_type) or not address:
            raise DsnParamError("ORCPT must be addr-type;xtext (RFC 3461 section 4.2)")
        _printable(xtext_decode(address), "ORCPT")
    return DsnRecipient(notify, orcpt)


def wants(dsn: DsnRecipient, condition: str, *, default: bool) -> bool:
    """Whether a notice on ``condition`` (SUCCESS, FAILURE, DELAY) goes out
    for a recipient: as its NOTIFY says, ``default`` when it gave none
    (RFC 3461 section 4.1: the MTA's choice, "FAILURE" or "FAILURE,DELAY")."""
    if dsn.notify is None:
        return default
    return condition in dsn.notify.split(",")


def original_recipient(dsn: DsnRecipient) -> str | None:
    """The Original-Recipient field's value (RFC 3464 section 2.3.1) from
    ORCPT: ``addr-type;address`` with the xtext decoded, or None."""
    if dsn.orcpt is None:
        return None
    addr_type, _, address = dsn.orcpt.partition(";")
    return f"{addr_type};{xtext_decode(address)}"


def envelope_id(dsn: DsnEnvelope) -> str | None:
    """The Original-Envelope-Id field's value (RFC 3464 section 2.2.1): the
    ENVID decoded, or None."""
    return None if dsn.envid is None else xtext_decode(dsn.envid)


__all__ = [
    "NO_DSN",
    "DsnParamError",
    "envelope_id",
    "mail_dsn",
    "original_recipient",
    "rcpt_dsn",
    "wants",
    "xtext_decode",
    "xtext_encode",
]
