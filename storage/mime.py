"""MIME parsing for ingest: raw RFC 5322 bytes in, a frozen ParsedMessage out.

The parse is pure and synchronous (callers run it in a thread) and never
raises on bad input: broken MIME is stored byte-exact by ingest and indexed
as far as it parses.

Offsets are computed by scanning the raw bytes (RFC 2046 section 5.1.1
boundaries) rather than taken from a re-serialised ``email.message``, so
IMAP FETCH BODY[section] can slice the blob directly. CRLF and bare-LF
line endings (even mixed) are both handled: a line ends at LF, and a CR
right before that LF belongs to the line ending.

Choices where the RFCs leave room, documented once here:

* Header bytes that are not valid UTF-8 are decoded per header field as
  UTF-8, falling back to latin-1 for the whole field when it is not valid
  UTF-8 (latin-1 maps every byte, so nothing is lost and nothing raises).
* The header block of an entity ends at the first empty line. A line
  without a colon inside it is skipped (it does not end the header, unlike
  the stdlib feed parser), so one garbage line does not turn the rest of
  the header into body. An entity whose first line is not a header field
  has no header at all: ``header_start == body_start``.
* A multipart whose boundary never appears (or that names none) gets one
  synthetic headerless text/plain child spanning its whole body, so its
  text stays readable and BODYSTRUCTURE keeps the 1*body RFC 3501 demands.
* NUL characters never reach stored strings (they become U+FFFD in the
  envelope and are dropped from derived text): PostgreSQL text and jsonb
  refuse them.
* ``size`` and ``lines`` count octets and lines as stored (bare LF counts
  one octet).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime as dt
import email.utils
import json
import mmap
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from storage.markup import EndTag, StartTag, Text, tokenize
from storage.model import Address, BodyPart, Envelope, ParsedMessage

# Deeper nesting than this is treated as opaque data: stops recursion
# bombs (Dovecot's default message_max_nesting is 100 as well).
MAX_NESTING = 100
# Cap on decoded text kept for the full-text index and the stored JSON.
MAX_BODY_TEXT = 1_000_000
PREVIEW_CHARS = 200

_TEXT_PLAIN_DEFAULT: tuple[tuple[str, str], ...] = (("charset", "us-ascii"),)
_HEADER_LINE = re.compile(rb"[^\s:]+[ \t]*:")
_WSP = b" \t"
_BLANK_LINE = re.compile(rb"\n\r?\n")  # a line ending, then an empty line


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
# Text helpers.
# ---------------------------------------------------------------------------


def _clean(s: str) -> str:
    """No NUL, no lone surrogate: safe for any database text column."""
    if "\x00" in s:
        s = s.replace("\x00", "\ufffd")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s


def _header_text(b: bytes) -> str:
    """Header bytes as str: UTF-8 (RFC 6532) else latin-1, which never fails."""
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        s = b.decode("latin-1")
    return _clean(s)


# Labels that senders use loosely: decode with the superset that real mail
# actually carries (as the WHATWG Encoding Standard does for the web).
_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "iso_8859-1": "cp1252",
    "us-ascii": "ascii",
    "x-unknown": "ascii",
    "unknown-8bit": "ascii",
    "iso-2022-jp": "iso2022_jp_ext",
    "shift-jis": "cp932",
    "shift_jis": "cp932",
    "x-sjis": "cp932",
    "tis-620": "cp874",
    "iso-8859-8-i": "iso-8859-8",
}


# Text codecs that are no mail charset, and some quadratic on hostile input
# (punycode's decoder is): a label naming one is treated as unknown.
_NOT_MAIL_CHARSETS = frozenset(
    {"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined"}
)


def _fallback_decode(data: bytes) -> str:
    """Undeclared or unknown charset: UTF-8 if it is, else windows-1252,
    else latin-1 (which maps every byte)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_charset(data: bytes, charset: str | None) -> str:
    """Decode ``data`` declared as ``charset``; never raises.

    Only text codecs are used (a charset label of "zlib" or "base64" must
    not run a bytes transform), unknown labels fall back as above.
    """
    label = (charset or "us-ascii").strip().strip("\"'").lower()
    name = _CHARSET_ALIASES.get(label, label)
    if name == "ascii":
        # Declared (or defaulted) US-ASCII that carries 8-bit bytes.
        return _fallback_decode(data)
    if name == "cp1252":
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return _fallback_decode(data)
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_MAIL_CHARSETS:
        return _fallback_decode(data)
    try:
        return data.decode(info.name, "replace")
    except Exception:  # a codec may raise anything on hostile input
        return _fallback_decode(data)


def _b64decode(data: bytes) -> bytes:
    """Lenient base64: junk characters dropped, missing padding supplied,
    decoding stops at the first "=", a trailing lone sextet ignored."""
    clean = re.sub(rb"[^A-Za-z0-9+/=]", b"", data)
    pad = clean.find(b"=")
    if pad >= 0:
        clean = clean[:pad]  # padding ends the data (RFC 2045 section 6.8)
    if len(clean) % 4 == 1:
        clean = clean[:-1]  # a lone sextet carries no whole octet
    clean += b"=" * (-len(clean) % 4)
    try:
        return base64.b64decode(clean)
    except (binascii.Error, ValueError):
        return b""


def _decode_transfer(data: bytes, encoding: str) -> bytes:
    """RFC 2045 section 6 content-transfer-encoding; unknown ones are identity."""
    if encoding == "BASE64":
        return _b64decode(data)
    if encoding == "QUOTED-PRINTABLE":
        try:
            return binascii.a2b_qp(data)
        except (binascii.Error, ValueError):
            return data
    return data


# RFC 2047 section 2 encoded-word; RFC 2231 section 5 allows "*lang".
_ENCODED_WORD_S = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")


def decode_words(value: str) -> str:
    """RFC 2047 decoding of a header value (section 6.2: whitespace between
    adjacent encoded-words is dropped; adjacent words of one charset are
    joined before decoding so a character split across words survives).
    Never raises."""
    if "=?" not in value:
        return value
    out: list[str] = []
    run_charset: str | None = None
    run: bytearray = bytearray()
    pos = 0

    def flush() -> None:
        nonlocal run_charset, run
        if run_charset is not None:
            out.append(decode_charset(bytes(run), run_charset))
        run_charset, run = None, bytearray()

    for m in _ENCODED_WORD_S.finditer(value):
        between = value[pos : m.start()]
        if between and not (run_charset is not None and between.strip(" \t\r\n") == ""):
            flush()
            out.append(between)
        charset, kind, text = m.group(1), m.group(2).upper(), m.group(3)
        raw = text.encode("latin-1", "replace")
        if kind == "B":
            data = _b64decode(raw)
        else:
            data = binascii.a2b_qp(raw.replace(b"_", b" "), header=False)
        if run_charset is not None and charset.lower() != run_charset.lower():
            flush()
        run_charset = charset
        run += data
        pos = m.end()
    flush()
    out.append(value[pos:])
    return _clean("".join(out))


_HTML_BLOCK = frozenset(
    "p br div li tr h1 h2 h3 h4 h5 h6 blockquote pre table ul ol hr title".split()
)
_HTML_HIDDEN = frozenset({"script", "style"})


def html_to_text(markup: str) -> str:
    """Visible text of an HTML body: tags and comments dropped, script and
    style skipped, entities expanded, block elements end a line.

    Built on :func:`storage.markup.tokenize`, so linear in ``len(markup)``
    whatever the markup (hostile mail reaches this unauthenticated, and
    this runs inside ingest). Never raises.
    """
    out: list[str] = []
    hidden: str | None = None  # inside <script> or <style>: raw text, no tags
    for token in tokenize(markup):
        if isinstance(token, Text):
            if hidden is None:
                out.append(token.data)
        elif hidden is not None:
            if isinstance(token, EndTag) and token.name == hidden:
                hidden = None
        elif isinstance(token, StartTag) and token.name in _HTML_HIDDEN:
            hidden = token.name
        elif token.name in _HTML_BLOCK:
            out.append("\n")
    lines = (" ".join(line.split()) for line in "".join(out).split("\n"))
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------
# Header block.
# ---------------------------------------------------------------------------


@dataclass
class _Fields:
    """Header fields of one entity in order: (lower-case name, unfolded value)."""

    items: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        for k, v in self.items:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]


def _line_end(raw: bytes, pos: int, end: int) -> int:
    """Index just past the line starting at ``pos`` (its LF included)."""
    nl = raw.find(b"\n", pos, end)
    return end if nl < 0 else nl + 1


def _is_blank(line: bytes) -> bool:
    return line in (b"\n", b"\r\n")


def header_end(raw: bytes, start: int, end: int) -> int:
    """Return ``body_start`` of the entity at ``start``..``end``.

    RFC 5322 section 2.1: the header ends at the first empty line, which
    belongs to the header block. No empty line: the header runs to ``end``.
    """
    if start >= end:
        return end
    first = raw[start : _line_end(raw, start, end)]
    if _is_blank(first):
        return start + len(first)
    if not _HEADER_LINE.match(first) and not first.startswith(b"From "):
        return start  # no header at all: the entity is all body
    m = _BLANK_LINE.search(raw, start, end)
    return end if m is None else m.end()


def _parse_fields(block: bytes) -> _Fields:
    """Split a header block into unfolded fields (RFC 5322 section 2.2.3).

    Values are as sent: encoded-words kept, leading and trailing white space
    stripped. Lines without a colon are skipped.
    """
    items: list[tuple[str, str]] = []
    name: bytes | None = None
    value: list[bytes] = []

    def flush() -> None:
        if name is not None:
            v = b"".join(value).strip(b" \t\r\n")
            items.append((_header_text(name).lower(), _header_text(v)))

    # Split at LF only: a lone CR inside a value must not start a new field.
    for line in block.split(b"\n"):
        body = line[:-1] if line.endswith(b"\r") else line
        if not body:
            break
        if body[:1] in (b" ", b"\t"):
            if name is not None:
                value.append(body)  # unfold: drop the line ending, keep the WSP
            continue
        colon = body.find(b":")
        if colon <= 0:
            continue  # garbage line or mbox "From " line
        flush()
        name = body[:colon].rstrip(_WSP)
        value = [body[colon + 1 :]]
    flush()
    return _Fields(items)


# One piece of a parameter list: a quoted-string (RFC 2045 section 5.1; an
# unterminated one runs to the end), a run of other text, or a ";". The
# alternatives start on distinct characters: no backtracking, linear.
_PARAM_PIECE = re.compile(r'"(?:[^"\\]|\\.)*"?|[^;"]+|;', re.DOTALL)
# RFC 2231 section 3 and 4: name*, name*N, name*N*.
_RFC2231_NAME = re.compile(r"([^*]+)\*(?:([0-9]{1,4})(\*?))?")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", value[1:-1])
    return value


def _rfc2231_value(segments: list[tuple[int, str, bool]]) -> str:
    """Join RFC 2231 continuations in order; percent-decode the encoded
    ones and decode with the charset named by the first (section 4)."""
    data = bytearray()
    charset: str | None = None
    for k, (_num, value, encoded) in enumerate(sorted(segments, key=lambda seg: seg[0])):
        if encoded and k == 0 and value.count("'") >= 2:
            charset, _lang, value = value.split("'", 2)
        data += urllib.parse.unquote_to_bytes(value) if encoded else value.encode("utf-8")
    return decode_charset(bytes(data), charset or None)


def _params(value: str | None) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(value, params) of a structured header (RFC 2045 section 5.1), the
    value and attribute names lower-case, RFC 2231 values collapsed; the
    first occurrence of a repeated attribute wins. None when absent.

    Our own single pass: the stdlib's ``_parseparam`` is quadratic on many
    parameters or an unterminated quote. Never raises."""
    if value is None:
        return None
    items: list[str] = []
    current: list[str] = []
    for m in _PARAM_PIECE.finditer(value):
        if m.group() == ";":
            items.append("".join(current))
            current = []
        else:
            current.append(m.group())
    items.append("".join(current))
    plain: list[tuple[str, str]] = []
    continued: dict[str, list[tuple[int, str, bool]]] = {}
    for item in items[1:]:
        name, _eq, raw = item.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        raw = _unquote(raw.strip())
        m = _RFC2231_NAME.fullmatch(name)
        if m is None:
            plain.append((name, raw))
            continue
        num = int(m.group(2)) if m.group(2) else 0
        encoded = name.endswith("*")
        continued.setdefault(m.group(1), []).append((num, raw, encoded))
    # As the stdlib did: plain attributes first, then the RFC 2231 ones.
    joined = [(name, _rfc2231_value(segs)) for name, segs in continued.items()]
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for name, val in plain + joined:
        if name not in seen:
            seen.add(name)
            out.append((name, _clean(val)))
    return items[0].strip().lower(), tuple(out)


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
    toks = list(_tokenize(value))
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
    return tuple(
        Address(*(None if f is None else _clean(f) for f in (a.name, a.adl, a.mailbox, a.host)))
        for a in out
    )


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


def _envelope(fields: _Fields) -> Envelope:
    """RFC 3501 section 7.4.2 ENVELOPE of a header."""

    def raw(name: str) -> str | None:
        v = fields.get(name)
        return None if v is None else v

    from_ = parse_addresses(fields.get("from"))
    sender = parse_addresses(fields.get("sender")) or from_
    reply_to = parse_addresses(fields.get("reply-to")) or from_
    return Envelope(
        date=raw("date"),
        subject=raw("subject"),
        from_=from_,
        sender=sender,
        reply_to=reply_to,
        to=parse_addresses(fields.get("to")),
        cc=parse_addresses(fields.get("cc")),
        bcc=parse_addresses(fields.get("bcc")),
        in_reply_to=raw("in-reply-to"),
        message_id=raw("message-id"),
    )


# ---------------------------------------------------------------------------
# Body structure.
# ---------------------------------------------------------------------------


def _count_lines(raw: bytes, start: int, end: int) -> int:
    """Lines of ``raw[start:end]``; a last line without LF counts too."""
    if end <= start:
        return 0
    if isinstance(raw, bytes):
        n = raw.count(b"\n", start, end)
    else:  # an mmap has no count(): count in bounded slices
        n = sum(raw[i : min(i + (1 << 20), end)].count(b"\n") for i in range(start, end, 1 << 20))
    return n if raw[end - 1 : end] == b"\n" else n + 1


def _find_delimiters(
    raw: bytes, boundary: bytes, start: int, end: int
) -> list[tuple[int, int, bool]]:
    """RFC 2046 section 5.1.1 delimiter lines in ``start``..``end``.

    Each is (line start, index past its line ending, is close-delimiter).
    A delimiter is "--" boundary at the start of a line, then optional "--",
    then only transport padding (white space) up to the line end. Scanning
    stops after the close-delimiter.
    """
    dash = b"--" + boundary
    out: list[tuple[int, int, bool]] = []
    pos = start
    while True:
        i = raw.find(dash, pos, end)
        if i < 0:
            break
        pos = i + len(dash)
        if i != start and raw[i - 1 : i] != b"\n":
            continue
        after = _line_end(raw, i, end)
        rest = raw[i + len(dash) : after]
        close = rest.startswith(b"--")
        if close:
            rest = rest[2:]
        if rest.strip(b" \t\r\n"):
            continue  # a longer boundary sharing our prefix, or junk
        out.append((i, after, close))
        if close:
            break
        pos = after
    return out


class _Parser:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def entity(
        self, start: int, end: int, digest_child: bool = False, depth: int = 0
    ) -> tuple[BodyPart, _Fields]:
        """The BodyPart of the entity at ``start``..``end`` and its header."""
        raw = self.raw
        body_start = header_end(raw, start, end)
        fields = _parse_fields(raw[start:body_start])
        ctype = _params(fields.get("content-type"))
        if ctype is None or ctype[0].count("/") != 1 or not all(ctype[0].split("/")):
            # RFC 2045 section 5.2 default; RFC 2046 section 5.1.5 in a digest.
            if digest_child:
                mtype, subtype, params = "message", "rfc822", ()
            else:
                mtype, subtype, params = "text", "plain", _TEXT_PLAIN_DEFAULT
        else:
            mtype, subtype = (x.strip() for x in ctype[0].split("/"))
            params = ctype[1]
        cte = fields.get("content-transfer-encoding")
        encoding = (cte.split(";")[0].strip().upper() if cte else "") or "7BIT"
        disp = _params(fields.get("content-disposition"))
        if disp is not None and not disp[0]:
            disp = None
        lang = fields.get("content-language")
        language = None
        if lang is not None:
            language = tuple(x for x in re.split(r"[\s,]+", lang) if x) or None

        children: tuple[BodyPart, ...] = ()
        m_env: Envelope | None = None
        m_body: BodyPart | None = None
        lines: int | None = None
        if mtype == "multipart" and depth >= MAX_NESTING:
            mtype, subtype = "application", "octet-stream"  # too deep: opaque
        if mtype == "multipart":
            children = self.multipart(params, subtype, body_start, end, depth)
        elif mtype == "message" and subtype == "rfc822":
            if depth < MAX_NESTING:
                m_body, inner = self.entity(body_start, end, depth=depth + 1)
                m_env = _envelope(inner)
            else:
                mtype, subtype = "application", "octet-stream"
        if mtype == "text" or (mtype, subtype) == ("message", "rfc822"):
            lines = _count_lines(raw, body_start, end)

        def opt(name: str) -> str | None:
            v = fields.get(name)
            return v if v else None

        part = BodyPart(
            type=mtype.lower(),
            subtype=subtype.lower(),
            params=params,
            id=opt("content-id"),
            description=opt("content-description"),
            encoding=encoding,
            size=end - body_start,
            lines=lines,
            md5=opt("content-md5"),
            disposition=disp,
            language=language,
            location=opt("content-location"),
            header_start=start,
            body_start=body_start,
            end=end,
            children=children,
            message_envelope=m_env,
            message_body=m_body,
        )
        return part, fields

    def multipart(
        self,
        params: tuple[tuple[str, str], ...],
        subtype: str,
        body_start: int,
        end: int,
        depth: int,
    ) -> tuple[BodyPart, ...]:
        raw = self.raw
        boundary = dict(params).get("boundary", "")
        delims: list[tuple[int, int, bool]] = []
        if boundary:
            # Header bytes were read as UTF-8 or else latin-1: try both back.
            for codec in ("utf-8", "latin-1"):
                delims = _find_delimiters(raw, boundary.encode(codec, "replace"), body_start, end)
                if delims or boundary.isascii():
                    break
        children: list[BodyPart] = []
        digest = subtype.lower() == "digest"
        for k, (_line, after, close) in enumerate(delims):
            if close:
                break
            if k + 1 < len(delims):
                nxt = delims[k + 1][0]
                # The line ending before a delimiter belongs to it (5.1.1).
                stop = nxt - 2 if raw[nxt - 2 : nxt] == b"\r\n" else nxt - 1
                stop = max(after, stop)
            else:
                stop = end  # no close-delimiter: the last part runs to the end
            children.append(self.entity(after, stop, digest, depth + 1)[0])
        if not children:
            # Boundary never seen: one headerless text part keeps the body
            # readable and BODYSTRUCTURE valid (RFC 3501 wants 1*body).
            children.append(
                BodyPart(
                    type="text",
                    subtype="plain",
                    params=_TEXT_PLAIN_DEFAULT,
                    id=None,
                    description=None,
                    encoding="7BIT",
                    size=end - body_start,
                    lines=_count_lines(raw, body_start, end),
                    md5=None,
                    disposition=None,
                    language=None,
                    location=None,
                    header_start=body_start,
                    body_start=body_start,
                    end=end,
                )
            )
        return tuple(children)


# ---------------------------------------------------------------------------
# Derived text.
# ---------------------------------------------------------------------------


def _walk(part: BodyPart) -> Iterator[BodyPart]:
    yield part
    for c in part.children:
        yield from _walk(c)
    if part.message_body is not None:
        yield from _walk(part.message_body)


def _is_attachment(part: BodyPart) -> bool:
    disp = part.disposition[0] if part.disposition else None
    if disp == "attachment":
        return True
    named = any(k in ("filename", "name") for k, _ in part.params) or (
        part.disposition is not None and any(k == "filename" for k, _ in part.disposition[1])
    )
    return named and disp != "inline"


def _part_text(raw: bytes, part: BodyPart) -> str:
    data = _decode_transfer(raw[part.body_start : part.end], part.encoding)
    text = decode_charset(data, dict(part.params).get("charset"))
    return text.replace("\r\n", "\n")


def _body_text(raw: bytes, root: BodyPart) -> str:
    """Text of the inline text/plain parts, or of text/html when there is no
    plain part; enclosed messages included."""
    plain: list[BodyPart] = []
    rich: list[BodyPart] = []
    for p in _walk(root):
        if p.type != "text" or _is_attachment(p):
            continue
        if p.subtype == "plain":
            plain.append(p)
        elif p.subtype == "html":
            rich.append(p)
    chunks: list[str] = []
    budget = MAX_BODY_TEXT
    for p in plain or rich:
        if budget <= 0:
            break
        text = _part_text(raw, p)
        if p.subtype == "html":
            # Markup beyond a few times the text budget cannot add visible text
            # we would keep: the cap bounds the tokenizer's (linear) work.
            text = html_to_text(text[: 4 * budget])
        text = text[:budget]
        budget -= len(text)
        chunks.append(text)
    return _clean("\n".join(chunks).replace("\x00", ""))


_MSG_ID = re.compile(r"<[^<>\s]*>")


def _first_msg_id(value: str | None) -> str | None:
    if not value:
        return None
    m = _MSG_ID.search(value)
    return m.group(0) if m else (value.split() or [None])[0]


def _sent_date(value: str | None) -> dt.datetime | None:
    """RFC 5322 section 3.3 date, timezone-aware; a missing or "-0000" zone
    is taken as UTC; None if unparsable."""
    if not value:
        return None
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if d is None:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d


def parse_message(raw: bytes | mmap.mmap, *, with_text: bool = True) -> ParsedMessage:
    """Parse a raw RFC 5322 message. Pure, synchronous, never raises.

    Offsets in the returned body structure index ``raw`` itself:
    ``raw[part.body_start:part.end]`` is a part's body as stored. An
    ``mmap`` of a spooled file is parsed in place, so a large APPEND or DATA
    is never copied whole into memory (only text parts are decoded).
    ``with_text=False`` skips the body text (and so search and preview).
    """
    if not isinstance(raw, bytes | mmap.mmap):
        raw = bytes(raw)
    parser = _Parser(raw)
    body, fields = parser.entity(0, len(raw))
    env = _envelope(fields)
    # Without text: the structure alone, when the full parse ran too long.
    text = _body_text(raw, body) if with_text else ""
    preview = " ".join(text[: PREVIEW_CHARS * 4].split())[:PREVIEW_CHARS]
    has_att = any(_is_attachment(p) for p in _walk(body) if p is not body) or any(
        p.type == "message" and p.subtype == "rfc822" for p in _walk(body) if p is not body
    )
    subject = fields.get("subject")
    return ParsedMessage(
        size=len(raw),
        envelope=env,
        body=body,
        subject=decode_words(subject).strip() if subject else "",
        from_text=addresses_text(env.from_),
        to_text=addresses_text(env.to),
        cc_text=addresses_text(env.cc),
        message_id=_first_msg_id(fields.get("message-id")),
        in_reply_to=_first_msg_id(fields.get("in-reply-to")),
        references=tuple(_MSG_ID.findall(fields.get("references") or "")),
        sent_date=_sent_date(fields.get("date")),
        body_text=text,
        preview=preview,
        has_attachments=has_att,
    )
