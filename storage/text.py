"""Text of a message: charsets, transfer encodings, RFC 2047 encoded
words, HTML to text, and the decoded body text the search index reads.

Split from :mod:`storage.mime` (which parses and re-exports these names).
Every function here never raises on bad input and is linear in it: mail
reaches this unauthenticated, and it runs inside ingest.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Iterator

from storage.markup import EndTag, StartTag, Text, tokenize
from storage.model import BodyPart

# Cap on decoded text kept for the full-text index and the stored JSON.
MAX_BODY_TEXT = 1_000_000


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


def part_octets(raw: bytes, part: BodyPart) -> bytes:
    """``part``'s body in ``raw`` with its transfer encoding undone (RFC 2045
    section 6), before any charset: what the anti-spam rules read."""
    return _decode_transfer(raw[part.body_start : part.end], part.encoding)


def _part_text(raw: bytes, part: BodyPart) -> str:
    data = part_octets(raw, part)
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
