"""IMAP structures of a parsed message: ENVELOPE addresses (RFC 5322
section 3.4 read as RFC 3501 section 7.4.2 wants them) and the compact
JSON form a ParsedMessage is stored in beside its blob.

Split from :mod:`storage.mime` (which parses and re-exports these names);
pure functions that never raise on bad input.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from storage.model import Address, BodyPart, Envelope, ParsedMessage
from storage.text import _clean, decode_words

# ---------------------------------------------------------------------------
# JSON form, stored beside the blob in the messages table.
# ---------------------------------------------------------------------------

JSON_VERSION = 1


def _addr_out(addrs: tuple[Address, ...]) -> list[list[str | None]]:
    return [[a.name, a.adl, a.mailbox, a.host] for a in addrs]


def _addr_in(rows: list[list[str | None]]) -> tuple[Address, ...]:
    return tuple(Address(r[0], r[1], r[2], r[3]) for r in rows)


def _env_out(e: Envelope) -> list[Any]:
    return [
        e.date,
        e.subject,
        _addr_out(e.from_),
        _addr_out(e.sender),
        _addr_out(e.reply_to),
        _addr_out(e.to),
        _addr_out(e.cc),
        _addr_out(e.bcc),
        e.in_reply_to,
        e.message_id,
    ]


def _env_in(v: list[Any]) -> Envelope:
    return Envelope(
        date=v[0],
        subject=v[1],
        from_=_addr_in(v[2]),
        sender=_addr_in(v[3]),
        reply_to=_addr_in(v[4]),
        to=_addr_in(v[5]),
        cc=_addr_in(v[6]),
        bcc=_addr_in(v[7]),
        in_reply_to=v[8],
        message_id=v[9],
    )


def _part_out(p: BodyPart) -> dict[str, Any]:
    # Short keys, None omitted: the form is stored once per message.
    d: dict[str, Any] = {"t": p.type, "s": p.subtype, "e": p.encoding, "z": p.size}
    d["o"] = [p.header_start, p.body_start, p.end]
    if p.params:
        d["p"] = [list(kv) for kv in p.params]
    if p.id is not None:
        d["i"] = p.id
    if p.description is not None:
        d["d"] = p.description
    if p.lines is not None:
        d["l"] = p.lines
    if p.md5 is not None:
        d["m"] = p.md5
    if p.disposition is not None:
        d["dp"] = [p.disposition[0], [list(kv) for kv in p.disposition[1]]]
    if p.language is not None:
        d["lg"] = list(p.language)
    if p.location is not None:
        d["lc"] = p.location
    if p.children:
        d["c"] = [_part_out(c) for c in p.children]
    if p.message_envelope is not None:
        d["me"] = _env_out(p.message_envelope)
    if p.message_body is not None:
        d["mb"] = _part_out(p.message_body)
    return d


def _part_in(d: dict[str, Any]) -> BodyPart:
    dp = d.get("dp")
    lg = d.get("lg")
    me = d.get("me")
    mb = d.get("mb")
    hs, bs, end = d["o"]
    return BodyPart(
        type=d["t"],
        subtype=d["s"],
        params=tuple((k, v) for k, v in d.get("p", ())),
        id=d.get("i"),
        description=d.get("d"),
        encoding=d["e"],
        size=d["z"],
        lines=d.get("l"),
        md5=d.get("m"),
        disposition=None if dp is None else (dp[0], tuple((k, v) for k, v in dp[1])),
        language=None if lg is None else tuple(lg),
        location=d.get("lc"),
        header_start=hs,
        body_start=bs,
        end=end,
        children=tuple(_part_in(c) for c in d.get("c", ())),
        message_envelope=None if me is None else _env_in(me),
        message_body=None if mb is None else _part_in(mb),
    )


def parsed_to_json(p: ParsedMessage) -> str:
    """Serialise a ParsedMessage compactly, without its ``body_text``;
    ``parsed_from_json`` inverts it exactly but for that field
    (``parsed_from_json(parsed_to_json(p)) == replace(p, body_text="")``).

    The decoded body text is what the search index reads; storage keeps it
    in a column of its own, so putting it here too would store it twice
    and make every message row (and every WAL write of it) that much larger.

    The output is plain JSON text with non-ASCII kept as UTF-8 characters
    and no NUL or lone surrogate when ``p`` came from :func:`parse_message`.
    """
    doc = {
        "v": JSON_VERSION,
        "z": p.size,
        "env": _env_out(p.envelope),
        "body": _part_out(p.body),
        "subj": p.subject,
        "from": p.from_text,
        "to": p.to_text,
        "cc": p.cc_text,
        "mid": p.message_id,
        "irt": p.in_reply_to,
        "refs": list(p.references),
        "date": None if p.sent_date is None else p.sent_date.isoformat(),
        "prev": p.preview,
        "att": p.has_attachments,
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def parsed_from_json(s: str) -> ParsedMessage:
    """Rebuild the ParsedMessage written by :func:`parsed_to_json`.

    Raises ``ValueError`` on a document of an unknown version.
    """
    doc = json.loads(s)
    if doc.get("v") != JSON_VERSION:
        raise ValueError(f"unknown parsed-message JSON version {doc.get('v')!r}")
    date = doc["date"]
    return ParsedMessage(
        size=doc["z"],
        envelope=_env_in(doc["env"]),
        body=_part_in(doc["body"]),
        subject=doc["subj"],
        from_text=doc["from"],
        to_text=doc["to"],
        cc_text=doc["cc"],
        message_id=doc["mid"],
        in_reply_to=doc["irt"],
        references=tuple(doc["refs"]),
        sent_date=None if date is None else dt.datetime.fromisoformat(date),
        body_text=doc.get("text", ""),  # written by earlier versions only
        preview=doc["prev"],
        has_attachments=doc["att"],
    )


# ---------------------------------------------------------------------------
# Addresses (RFC 5322 section 3.4, as RFC 3501 ENVELOPE wants them).
# ---------------------------------------------------------------------------


def _tokenize(s: str) -> Iterator[tuple[str, str]]:
    """Tokens of an address list: ("q", quoted text), ("c", comment),
    ("l", domain literal), ("s", special char), ("a", atom)."""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t\r\n":
            i += 1
        elif c == '"':
            j, buf = i + 1, []
            while j < n and s[j] != '"':
                if s[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(s[j])
                j += 1
            yield "q", "".join(buf)
            i = j + 1
        elif c == "(":
            depth, j, buf = 1, i + 1, []
            while j < n and depth:
                if s[j] == "\\" and j + 1 < n:
                    j += 1
                elif s[j] == "(":
                    depth += 1
                elif s[j] == ")":
                    depth -= 1
                    if not depth:
                        break
                buf.append(s[j])
                j += 1
            yield "c", "".join(buf).strip()
            i = j + 1
        elif c == "[":
            j = s.find("]", i)
            j = n if j < 0 else j + 1
            yield "l", s[i:j]
            i = j
        elif c in "<>@,;:":
            yield "s", c
            i += 1
        else:
            # "." stays inside atoms: dot-atoms and obs-phrase (RFC 5322
            # section 4.1) both keep it, and "J. Doe" keeps its space.
            j = i + 1  # always advance: a stray ")" or "]" is an atom of its own
            while j < n and s[j] not in ' \t\r\n"()[]<>@,;:':
                j += 1
            yield "a", s[i:j]
            i = j


def _phrase(tokens: list[tuple[str, str]]) -> str | None:
    return " ".join(v for k, v in tokens if k in ("a", "q")) or None


_DOT_ATOM = re.compile(r"[^\s\"()<>@,;:.\[\]\\]+(\.[^\s\"()<>@,;:.\[\]\\]+)*")


def _addr_spec(tokens: list[tuple[str, str]]) -> tuple[str | None, str, str]:
    """(adl, mailbox, host) of ``[route ":"] local "@" domain``."""
    adl = None
    colon = next((i for i, t in enumerate(tokens) if t == ("s", ":")), -1)
    if colon >= 0:
        adl = "".join(v for k, v in tokens[:colon] if k != "c") or None
        tokens = tokens[colon + 1 :]
    at = next((i for i, t in enumerate(tokens) if t == ("s", "@")), -1)
    local_t = tokens if at < 0 else tokens[:at]
    domain_t = [] if at < 0 else tokens[at + 1 :]
    # A quoted local part keeps its quotes unless it is a plain dot-atom.
    local = "".join(
        f'"{v}"' if k == "q" and not _DOT_ATOM.fullmatch(v) else v for k, v in local_t if k != "c"
    )
    host = "".join(v for k, v in domain_t if k != "c")
    return adl, local, host


def _mailbox(tokens: list[tuple[str, str]]) -> Address | None:
    if not tokens:
        return None
    comments = [v for k, v in tokens if k == "c" and v]
    if ("s", "<") in tokens:
        lt = tokens.index(("s", "<"))
        gt = next((i for i in range(lt, len(tokens)) if tokens[i] == ("s", ">")), len(tokens))
        name = _phrase(tokens[:lt])
        adl, local, host = _addr_spec(tokens[lt + 1 : gt])
    else:
        name = None
        adl, local, host = _addr_spec(tokens)
        if not local and not host:
            return None
    if name is None and comments:
        name = comments[-1]  # "user@host (Real Name)" old style
    # A missing domain becomes "" not NIL: NIL host means group syntax.
    return Address(name, adl, local, host)


def parse_addresses(value: str | None) -> tuple[Address, ...]:
    """An address-list header as RFC 3501 ENVELOPE addresses, groups as
    start/end markers (section 7.4.2). Never raises; empty for NIL."""
    if not value:
        return ()
    # Cleaned once here: every field below is a piece of it, so clean too
    # (cleaning each field instead took half the time of a long list).
    toks = list(_tokenize(_clean(value)))
    out: list[Address] = []
    i, n = 0, len(toks)
    in_group = False
    cur: list[tuple[str, str]] = []
    angle = False

    cur_has_at = False  # kept as a flag: testing "@" in cur each time is quadratic

    def end_mailbox() -> None:
        nonlocal cur_has_at
        a = _mailbox(cur)
        if a is not None:
            out.append(a)
        cur.clear()
        cur_has_at = False

    while i < n:
        t = toks[i]
        if t == ("s", "<"):
            angle = True
        elif t == ("s", ">"):
            angle = False
        if not angle and (t == ("s", ",") or (in_group and t == ("s", ";"))):
            end_mailbox()
            if t == ("s", ";"):
                in_group = False
                out.append(Address(None, None, None, None))
        elif not angle and t == ("s", ":") and not in_group and not cur_has_at:
            name = _phrase(cur) or ""
            cur.clear()
            in_group = True
            out.append(Address(None, None, name, None))
        elif not angle and t == ("s", ";"):
            pass  # stray ";" outside a group
        else:
            cur.append(t)
            cur_has_at = cur_has_at or t == ("s", "@")
        i += 1
    end_mailbox()
    if in_group:
        out.append(Address(None, None, None, None))  # unterminated group
    return tuple(out)


def addresses_text(addrs: tuple[Address, ...]) -> str:
    """Decoded display form, ``Name <mailbox@host>`` joined by ", "."""
    out: list[str] = []
    group: list[str] | None = None
    group_name = ""
    for a in addrs:
        if a.host is None and a.mailbox is not None and a.name is None and a.adl is None:
            group, group_name = [], decode_words(a.mailbox)
            continue
        if a.mailbox is None and a.host is None:
            if group is not None:
                out.append(f"{group_name}: {', '.join(group)};")
            group = None
            continue
        spec = a.mailbox or ""
        if a.host:
            spec += "@" + a.host
        item = f"{decode_words(a.name)} <{spec}>" if a.name else spec
        (group if group is not None else out).append(item)
    if group is not None:
        out.append(f"{group_name}: {', '.join(group)};")
    return ", ".join(out)


def envelope(field: Callable[[str], str | None]) -> Envelope:
    """RFC 3501 section 7.4.2 ENVELOPE of a header; ``field(name)`` is the
    first unfolded value of the lower-case field ``name``, or None."""
    from_ = parse_addresses(field("from"))
    sender = parse_addresses(field("sender")) or from_
    reply_to = parse_addresses(field("reply-to")) or from_
    return Envelope(
        date=field("date"),
        subject=field("subject"),
        from_=from_,
        sender=sender,
        reply_to=reply_to,
        to=parse_addresses(field("to")),
        cc=parse_addresses(field("cc")),
        bcc=parse_addresses(field("bcc")),
        in_reply_to=field("in-reply-to"),
        message_id=field("message-id"),
    )
