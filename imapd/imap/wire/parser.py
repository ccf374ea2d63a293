"""IMAP command parser: framed pieces in, a frozen :mod:`commands` dataclass out.

:func:`parse_command` takes the text segments of one command (as the
:class:`~imapd.imap.wire.framing.Framer` produced them, each non-final one
ending with its literal marker) and the literal values in order. It never
raises: a malformed command gives a :class:`ParseError` for a tagged BAD.
Everything is linear in the input; recursion (parenthesised search keys,
NOT, OR) is bounded by :data:`MAX_NESTING`.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Callable, Sequence

from imapd.imap.wire import commands as c
from imapd.imap.wire.utf7 import Utf7Error, decode_mailbox

MAX_NESTING = 32  # parenthesis / NOT / OR depth in SEARCH; deeper is abuse
MAX_NUMBER = 2**32 - 1  # RFC 3501 section 9: number is a 32-bit unsigned
MAX_NUMBER64 = 2**63 - 1  # RFC 7162 section 7: mod-sequence-value
_MAX_DIGITS = 20  # more digits than any number above, even with leading zeros

_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\\]]+")
_ASTRING_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\]+")
_LIST_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){\"\\]+")
_TAG = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\+]+")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"')
_LITERAL = re.compile(rb"\{(\d{1,20})\+?\}$")
_NUMBER = re.compile(rb"\d+")
_SEQSET = re.compile(rb"[0-9:*,$]+")
_FETCH_SECTIONED = re.compile(rb"(BODY\.PEEK|BODY|BINARY\.PEEK|BINARY\.SIZE|BINARY)\[", re.I)
_SECTION_PART = re.compile(rb"(?:[1-9]\d{0,8})(?:\.[1-9]\d{0,8})*")
_PARTIAL = re.compile(rb"<(\d{1,10})\.(\d{1,10})>")
_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    )
}
_DATE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})")
_DATE_TIME = re.compile(
    rb'"([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"'
)
_SASL_IR = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_QUOTED_DATE = re.compile(rb'"[^"]*"')
_SECTION_TEXT = re.compile(rb"HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME", re.I)
_STORE_ITEM = re.compile(rb"([+-]?)FLAGS(\.SILENT)?", re.I)

SYSTEM_FLAGS = {f.upper(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}

FETCH_MACROS = {
    # RFC 3501 section 6.4.5
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SIMPLE_FETCH = {
    "ENVELOPE",
    "FLAGS",
    "INTERNALDATE",
    "RFC822",
    "RFC822.HEADER",
    "RFC822.SIZE",
    "RFC822.TEXT",
    "BODY",
    "BODYSTRUCTURE",
    "UID",
    "MODSEQ",
    "EMAILID",  # RFC 8474 section 5.1
    "THREADID",  # RFC 8474 section 5.2
    "SAVEDATE",  # RFC 8514 section 3
}
# RFC 5258 section 3 (REMOTE: there are no remote mailboxes here to list),
# RFC 6154 section 3 (SPECIAL-USE), RFC 5819 section 2 (STATUS).
_LIST_SELECTION_OPTIONS = {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
# RFC 9590 (METADATA).
_LIST_RETURN_OPTIONS = {"SUBSCRIBED", "CHILDREN", "STATUS", "SPECIAL-USE", "METADATA"}
_STATUS_ITEMS = {
    "MESSAGES",
    "RECENT",
    "UIDNEXT",
    "UIDVALIDITY",
    "UNSEEN",
    "HIGHESTMODSEQ",
    "SIZE",
    "APPENDLIMIT",
    "MAILBOXID",  # RFC 8474 section 4.2
    "DELETED",  # RFC 9051 section 6.3.11, RFC 9208 section 4.1.4
    "DELETED-STORAGE",  # RFC 9208 section 4.1.4
}


# RFC 8474 section 7: objectid = 1*255(ALPHA / DIGIT / "_" / "-").
_OBJECTID = re.compile(r"[A-Za-z0-9_-]{1,255}")


class _Bad(Exception):
    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class _Reader:
    """A cursor over the text segments and literals of one command."""

    __slots__ = ("buf", "lits", "pos", "segs", "si", "utf8")

    def __init__(
        self, segments: Sequence[bytes], literals: Sequence[object], utf8: bool = False
    ) -> None:
        self.segs = segments
        self.lits = literals
        self.si = 0
        self.buf = segments[0]
        self.pos = 0
        self.utf8 = utf8  # the client enabled UTF8=ACCEPT (RFC 6855)

    # -- low level
    def peek(self) -> int:
        return self.buf[self.pos] if self.pos < len(self.buf) else -1

    def at_end(self) -> bool:
        return self.pos >= len(self.buf) and self.si >= len(self.segs) - 1

    def expect_end(self) -> None:
        if not self.at_end():
            raise _Bad("Unexpected extra arguments")

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise _Bad("Missing argument" if self.at_end() else "Expected a space")
        self.pos += 1

    def try_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def char(self, ch: int, what: str) -> None:
        if self.peek() != ch:
            raise _Bad(f"Expected {what}")
        self.pos += 1

    def match(self, regex: re.Pattern[bytes]) -> re.Match[bytes] | None:
        m = regex.match(self.buf, self.pos)
        if m:
            self.pos = m.end()
        return m

    # -- tokens
    def atom(self, what: str = "an atom") -> str:
        m = self.match(_ATOM)
        if not m:
            raise _Bad(f"Expected {what}")
        return m.group().decode("ascii")

    def number(self, limit: int = MAX_NUMBER, nonzero: bool = False) -> int:
        m = self.match(_NUMBER)
        if not m:
            raise _Bad("Expected a number")
        if len(m.group()) > _MAX_DIGITS:
            raise _Bad("Number out of range")  # int() of a long string is slow
        n = int(m.group())
        if n > limit or (nonzero and n == 0):
            raise _Bad("Number out of range")
        return n

    def literal(self) -> object:
        """At "{": the literal value (bytes or the connection's spool object)."""
        m = _LITERAL.match(self.buf, self.pos)
        if not m or self.si + 1 >= len(self.segs) or self.si >= len(self.lits):
            raise _Bad("Malformed literal")
        value = self.lits[self.si]
        self.si += 1
        self.buf = self.segs[self.si]
        self.pos = 0
        return value

    def string_bytes(self) -> bytes:
        ch = self.peek()
        if ch == 0x22:
            m = self.match(_QUOTED)
            if not m:
                raise _Bad("Malformed quoted string")
            raw = m.group(1)
            return raw.replace(b'\\"', b'"').replace(b"\\\\", b"\\") if b"\\" in raw else raw
        if ch == 0x7B:
            value = self.literal()
            if not isinstance(value, bytes):
                raise _Bad("Literal too large here")
            return value
        raise _Bad("Expected a string")

    def astring_bytes(self) -> bytes:
        ch = self.peek()
        if ch in (0x22, 0x7B):
            return self.string_bytes()
        m = self.match(_ASTRING_ATOM)
        if not m:
            raise _Bad("Expected a string")
        return m.group()

    def astring(self) -> str:
        return _text(self.astring_bytes())

    def nstring(self) -> str | None:
        if self.buf[self.pos : self.pos + 3].upper() == b"NIL" and not _ATOM.match(
            self.buf, self.pos + 3
        ):
            self.pos += 3
            return None
        return _text(self.string_bytes())

    def mailbox(self) -> str:
        raw = self.astring_bytes()
        return _utf8_mailbox_name(raw) if self.utf8 else _mailbox_name(raw)

    def list_mailbox(self) -> str:
        ch = self.peek()
        if ch in (0x22, 0x7B):
            raw = self.string_bytes()
        else:
            m = self.match(_LIST_ATOM)
            if not m:
                raise _Bad("Expected a mailbox pattern")
            raw = m.group()
        return _utf8_mailbox_name(raw) if self.utf8 else _mailbox_name(raw)

    def paren_list(self, item: Callable[[], object]) -> list[object]:
        """ "(" [item *(SP item)] ")" """
        self.char(0x28, "(")
        out: list[object] = []
        if self.peek() == 0x29:
            self.pos += 1
            return out
        while True:
            out.append(item())
            if self.peek() == 0x29:
                self.pos += 1
                return out
            self.sp()

    def sequence_set(self) -> c.SequenceSet:
        m = self.match(_SEQSET)
        if not m:
            raise _Bad("Expected a sequence set")
        return parse_sequence_set(m.group())


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _mailbox_name(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        # Not modified UTF-7: take raw UTF-8 as many clients send it.
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad("Mailbox name is neither modified UTF-7 nor UTF-8") from None
    try:
        name = decode_mailbox(text)
    except Utf7Error as exc:
        raise _Bad(f"Bad mailbox name: {exc}") from None
    # RFC 3501 section 5.1: INBOX is case-insensitive.
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX/":
        return "INBOX" + name[5:]
    return name


# RFC 6855 section 3 (RFC 5198 section 2 Net-Unicode): no control
# characters, no DEL, no line or paragraph separator in a mailbox name.
_NOT_NET_UNICODE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _utf8_mailbox_name(raw: bytes) -> str:
    """A mailbox name from a client that enabled UTF8=ACCEPT: UTF-8, not
    modified UTF-7 ("&" is itself, RFC 6855 section 3), in Unicode
    normalization form C (RFC 5198 section 2)."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("Mailbox name is not UTF-8") from None
    if _NOT_NET_UNICODE.search(name):
        raise _Bad("Mailbox name has a control character")
    name = unicodedata.normalize("NFC", name)
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX/":
        return "INBOX" + name[5:]
    return name


def parse_sequence_set(token: bytes) -> c.SequenceSet:
    """``1:4,7,9:*`` -> ranges; linear in the length of the token. ``$``
    alone is the saved search result (RFC 5182 section 3: seq-last-command)."""
    if token == b"$":
        return c.SequenceSet((), saved=True)
    ranges: list[tuple[int | None, int | None]] = []
    append = ranges.append
    for part in token.split(b","):
        first, sep, last = part.partition(b":")
        a = _seq_number(first)
        b = _seq_number(last) if sep else a
        append((a, b))
    return c.SequenceSet(tuple(ranges))


def _seq_number(tok: bytes) -> int | None:
    if tok == b"*":
        return None
    if not tok.isdigit() or tok[0] == 0x30 or len(tok) > 10:
        raise _Bad("Invalid sequence set")
    n = int(tok)
    if n > MAX_NUMBER:
        raise _Bad("Invalid sequence set")
    return n


def _flag(r: _Reader) -> str:
    if r.peek() == 0x5C:  # "\"
        r.pos += 1
        name = "\\" + r.atom("a flag")
        canon = SYSTEM_FLAGS.get(name.upper())
        if canon is None:
            # RFC 3501 section 2.3.2: \Recent is not settable, and
            # flag-extension names are reserved.
            raise _Bad(f"Invalid system flag {name}")
        return canon
    return r.atom("a flag")


def _flag_list(r: _Reader) -> tuple[str, ...]:
    return tuple(r.paren_list(lambda: _flag(r)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Command argument parsers


def _p_simple(r: _Reader, tag: str, name: str) -> c.Command:
    r.expect_end()
    return c.Simple(tag=tag, name=name)


def _p_authenticate(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    mech = r.atom("a SASL mechanism").upper()
    initial = None
    if r.try_sp():  # RFC 4959 SASL-IR
        m = r.match(_SASL_IR)
        initial = m.group() if m else b""
        if not initial:
            raise _Bad("Bad initial response")
    r.expect_end()
    return c.Authenticate(tag=tag, name=name, mechanism=mech, initial_response=initial)


def _p_login(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    user = r.astring()
    r.sp()
    password = r.astring()
    r.expect_end()
    return c.Login(tag=tag, name=name, username=user, password=password)


def _p_select(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    mailbox = r.mailbox()
    condstore = False
    qresync = None
    if r.try_sp():
        r.char(0x28, "(")
        while True:
            param = r.atom("a select parameter").upper()
            if param == "CONDSTORE":  # RFC 7162 section 3.1.8
                condstore = True
            elif param == "QRESYNC":  # RFC 7162 section 3.2.5
                r.sp()
                qresync = _qresync_params(r)
            else:
                raise _Bad(f"Unknown select parameter {param}")
            if r.peek() == 0x29:
                r.pos += 1
                break
            r.sp()
    r.expect_end()
    return c.Select(tag=tag, name=name, mailbox=mailbox, condstore=condstore, qresync=qresync)


def _qresync_params(r: _Reader) -> c.QresyncParams:
    r.char(0x28, "(")
    uidvalidity = r.number(nonzero=True)
    r.sp()
    modseq = r.number(MAX_NUMBER64, nonzero=True)
    known = None
    seq_match = None
    if r.try_sp():
        if r.peek() != 0x28:
            known = r.sequence_set()
            r.try_sp()
        if r.peek() == 0x28:
            r.pos += 1
            seqs = r.sequence_set()
            r.sp()
            uids = r.sequence_set()
            r.char(0x29, ")")
            seq_match = (seqs, uids)
    r.char(0x29, ")")
    return c.QresyncParams(
        uidvalidity=uidvalidity, modseq=modseq, known_uids=known, seq_match=seq_match
    )


def _p_mailbox(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    mailbox = r.mailbox()
    use: tuple[str, ...] = ()
    if name == "CREATE" and r.try_sp():
        # RFC 6154 section 3: CREATE name (USE (\Sent))
        r.char(0x28, "(")
        if r.atom("USE").upper() != "USE":
            raise _Bad("Unknown CREATE parameter")
        r.sp()
        use = tuple(
            r.paren_list(lambda: "\\" + (r.char(0x5C, "\\"), r.atom())[1])  # type: ignore[arg-type]
        )
        r.char(0x29, ")")
    r.expect_end()
    return c.MailboxCommand(tag=tag, name=name, mailbox=mailbox, special_use=use)


def _p_rename(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    old = r.mailbox()
    r.sp()
    new = r.mailbox()
    r.expect_end()
    return c.Rename(tag=tag, name=name, old=old, new=new)


def _p_list(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    selection: list[str] = []
    if name == "LIST" and r.peek() == 0x28:  # RFC 5258 selection options
        selection = [str(x).upper() for x in r.paren_list(r.atom)]
        _check_list_selection(selection)
        r.sp()
    reference = r.mailbox()
    r.sp()
    if name == "LIST" and r.peek() == 0x28:
        patterns = tuple(str(x) for x in r.paren_list(r.list_mailbox))
    else:
        patterns = (r.list_mailbox(),)
    returns: list[str] = []
    status_items: tuple[str, ...] = ()
    entries: tuple[str, ...] = ()
    maxsize: int | None = None
    if name == "LIST" and r.try_sp():
        if r.atom("RETURN").upper() != "RETURN":
            raise _Bad("Expected RETURN")
        r.sp()
        r.char(0x28, "(")
        while r.peek() != 0x29:
            opt = r.atom("a return option").upper()
            if opt not in _LIST_RETURN_OPTIONS:
                raise _Bad(f"Unknown LIST return option {opt[:40]}")  # RFC 5258 section 3
            if opt == "METADATA" and opt in returns:
                raise _Bad("METADATA given twice")
            returns.append(opt)
            if opt == "STATUS":  # RFC 5819
                r.sp()
                status_items = _status_items(r)
            elif opt == "METADATA":
                r.sp()
                entries, maxsize = _list_metadata(r)
            if r.peek() != 0x29:
                r.sp()
        r.pos += 1
    r.expect_end()
    return c.ListCommand(
        tag=tag,
        name=name,
        reference=reference,
        patterns=patterns,
        selection=tuple(selection),
        returns=tuple(returns),
        status_items=status_items,
        metadata=entries,
        metadata_maxsize=maxsize,
    )


def _list_metadata(r: _Reader) -> tuple[tuple[str, ...], int | None]:
    """RFC 9590 section 5: return-option =/ "METADATA" SP "(" entry
    *(SP entry) ")", entries checked as GETMETADATA's are (RFC 5464
    section 3.2.1), at most MAX_METADATA_ENTRIES of them. Then, beyond
    RFC 9590's grammar (a client keeping to it never sends it): SP
    "MAXSIZE" SP number, GETMETADATA's MAXSIZE (RFC 5464 section 4.2.1)
    for every mailbox listed."""
    entries = [str(e) for e in r.paren_list(lambda: _entry_name(r, False))]
    if not entries:
        raise _Bad("METADATA needs at least one entry")
    if len(entries) > MAX_METADATA_ENTRIES:
        raise _Bad(f"At most {MAX_METADATA_ENTRIES} entries at once")
    maxsize = None
    if r.buf[r.pos : r.pos + 9].upper() == b" MAXSIZE ":
        r.pos += 9
        maxsize = r.number()
    return tuple(dict.fromkeys(entries)), maxsize


def _check_list_selection(options: list[str]) -> None:
    """RFC 5258 section 3: an unknown selection option is BAD, and so is
    RECURSIVEMATCH with nothing (or only REMOTE) for it to recurse on."""
    for opt in options:
        if opt not in _LIST_SELECTION_OPTIONS:
            raise _Bad(f"Unknown LIST selection option {opt[:40]}")
    if "RECURSIVEMATCH" in options and not set(options) - {"RECURSIVEMATCH", "REMOTE"}:
        raise _Bad("RECURSIVEMATCH needs another selection option")


def _status_items(r: _Reader) -> tuple[str, ...]:
    items = tuple(str(x).upper() for x in r.paren_list(r.atom))
    for item in items:
        if item not in _STATUS_ITEMS:
            raise _Bad(f"Unknown STATUS item {item}")
    return items


def _p_status(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    items = _status_items(r)
    if not items:
        raise _Bad("STATUS needs at least one item")
    r.expect_end()
    return c.Status(tag=tag, name=name, mailbox=mailbox, items=items)


def parse_date_time(raw: bytes) -> dt.datetime:
    """RFC 3501 section 9 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz"."""
    m = _DATE_TIME.fullmatch(raw)
    if not m:
        raise _Bad("Invalid date-time")
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    month = _MONTHS.get(mon.decode().upper())
    if month is None:
        raise _Bad("Invalid month")
    offset = dt.timedelta(hours=int(zh), minutes=int(zm))
    try:
        return dt.datetime(
            int(year),
            month,
            int(day),
            int(hh),
            int(mm),
            int(ss),
            tzinfo=dt.timezone(-offset if sign == b"-" else offset),
        )
    except ValueError:
        raise _Bad("Invalid date-time") from None


def _p_append(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    flags, date, message = _append_message(r)
    more: list[c.AppendMessage] = []
    while r.peek() == 0x20:  # RFC 3502 section 6.3.11: append-message *(SP append-message)
        r.sp()
        while r.peek() == 0x20:  # imapclient (4.x, with LITERAL+) sends two SPs here
            r.pos += 1
        more.append(c.AppendMessage(*_append_message(r)))
    r.expect_end()
    return c.Append(
        tag=tag,
        name=name,
        mailbox=mailbox,
        flags=flags,
        internal_date=date,
        message=message,
        more=tuple(more),
    )


def _append_message(r: _Reader) -> tuple[tuple[str, ...], dt.datetime | None, object]:
    """append-message = [SP flag-list] [SP date-time] SP (literal / literal8
    / "UTF8" SP "(" literal8 ")") (RFC 3502 section 6.3.11, RFC 3516
    section 4.4, RFC 6855 section 4); starts after the SP."""
    flags: tuple[str, ...] = ()
    date = None
    if r.peek() == 0x28:
        flags = _flag_list(r)
        r.sp()
    if r.peek() == 0x22:
        m = r.match(_QUOTED_DATE)
        if m is None:
            raise _Bad("Invalid date-time")  # a quote never closed
        date = parse_date_time(m.group())
        r.sp()
    if r.buf[r.pos : r.pos + 6].upper() == b"UTF8 (":
        # RFC 6855 section 4: append-data =/ "UTF8" SP "(" literal8 ")",
        # only once the client enabled UTF8=ACCEPT.
        if not r.utf8:
            raise _Bad("APPEND UTF8 needs ENABLE UTF8=ACCEPT first")
        r.pos += 6
        if r.peek() != 0x7E:
            raise _Bad("APPEND UTF8 takes a literal8")
        r.pos += 1
        if r.peek() != 0x7B:
            raise _Bad("Expected the message literal")
        message = r.literal()
        r.char(0x29, ")")
        return flags, date, message
    if r.buf[r.pos : r.pos + 10].upper() == b"CATENATE (":
        r.pos += 10
        return flags, date, _catenate(r)
    if r.peek() == 0x7E:  # RFC 3516 section 4.4: "~{n}", a literal8 of binary content
        r.pos += 1
    if r.peek() != 0x7B:
        raise _Bad("Expected the message literal")
    return flags, date, r.literal()


def _catenate(r: _Reader) -> c.Catenate:
    """After "CATENATE (": cat-part *(SP cat-part) ")" (RFC 4469 section 5):
    cat-part = "TEXT" SP literal / "URL" SP astring; TEXT also takes a
    literal8 (RFC 4469 section 5 with RFC 3516 section 4.4). One pass, no
    recursion: a CATENATE holds no nested lists."""
    parts: list[object] = []
    while True:
        head = r.buf[r.pos : r.pos + 5].upper()
        if head == b"TEXT ":
            r.pos += 5
            if r.peek() == 0x7E:
                r.pos += 1
            if r.peek() != 0x7B:
                raise _Bad("CATENATE TEXT takes a literal")
            parts.append(r.literal())
        elif head[:4] == b"URL ":
            r.pos += 4
            parts.append(_text(r.astring_bytes()))
        else:
            raise _Bad("Expected a CATENATE part (TEXT or URL)")
        if r.peek() == 0x29:
            r.pos += 1
            return c.Catenate(tuple(parts))
        r.sp()


def parse_url_section(text: str) -> c.Section | None:
    """An IMAP URL's ``;SECTION=`` value (RFC 5092 section 3, already
    percent-decoded) as a FETCH section spec (RFC 3501 section 6.4.5),
    parsed by the same rules as FETCH BODY[...]; None if it is not one."""
    try:
        raw = text.encode("utf-8") + b"]"
    except UnicodeEncodeError:
        return None
    r = _Reader([raw], ())
    try:
        section = _section(r)
    except _Bad:
        return None
    return section if r.at_end() else None


def _search_date(r: _Reader) -> dt.date:
    quoted = r.peek() == 0x22
    if quoted:
        r.pos += 1
    m = r.match(_DATE)
    if not m:
        raise _Bad("Invalid date")
    if quoted:
        r.char(0x22, '"')
    month = _MONTHS.get(m.group(2).decode().upper())
    if month is None:
        raise _Bad("Invalid month")
    try:
        return dt.date(int(m.group(3)), month, int(m.group(1)))
    except ValueError:
        raise _Bad("Invalid date") from None


_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {"BCC", "CC", "FROM", "SUBJECT", "TO"}
_DATE_KEYS = {
    "BEFORE": ("internal", "before"),
    "ON": ("internal", "on"),
    "SINCE": ("internal", "since"),
    "SENTBEFORE": ("sent", "before"),
    "SENTON": ("sent", "on"),
    "SENTSINCE": ("sent", "since"),
    # RFC 8514 section 4: the save date's day.
    "SAVEDBEFORE": ("saved", "before"),
    "SAVEDON": ("saved", "on"),
    "SAVEDSINCE": ("saved", "since"),
}


def _search_key(r: _Reader, depth: int) -> c.SearchKey:
    if depth > MAX_NESTING:
        raise _Bad("Search nesting too deep")
    ch = r.peek()
    if ch == 0x28:
        r.pos += 1
        keys = [_search_key(r, depth + 1)]
        while r.peek() != 0x29:
            r.sp()
            keys.append(_search_key(r, depth + 1))
        r.pos += 1
        return keys[0] if len(keys) == 1 else c.SearchAnd(tuple(keys))
    if 0x30 <= ch <= 0x39 or ch in (0x2A, 0x24):
        return c.SearchSequence(r.sequence_set(), uid=False)
    word = r.atom("a search key").upper()
    if word == "ALL":
        return c.SearchAll()
    if word == "SAVEDATESUPPORTED":
        # RFC 8514 section 4: every message of a mailbox that keeps save
        # dates; every mailbox here does.
        return c.SearchAll()
    if word in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[word]
        return c.SearchFlag(flag, present)
    if word in ("KEYWORD", "UNKEYWORD"):
        r.sp()
        return c.SearchFlag(r.atom("a keyword"), word == "KEYWORD")
    if word == "RECENT":
        return c.SearchRecent(True)
    if word == "OLD":
        return c.SearchRecent(False)
    if word == "NEW":
        return c.SearchAnd((c.SearchRecent(True), c.SearchFlag("\\Seen", False)))
    if word in _HEADER_KEYS:
        r.sp()
        return c.SearchHeader(word.lower(), r.astring())
    if word == "HEADER":
        r.sp()
        field = r.astring()
        r.sp()
        return c.SearchHeader(field.lower(), r.astring())
    if word in ("BODY", "TEXT"):
        r.sp()
        return c.SearchText(word.lower(), r.astring())
    if word in _DATE_KEYS:
        r.sp()
        field, op = _DATE_KEYS[word]
        return c.SearchDate(field, op, _search_date(r))
    if word in ("LARGER", "SMALLER"):
        r.sp()
        return c.SearchSize(word.lower(), r.number())
    if word == "UID":
        r.sp()
        return c.SearchSequence(r.sequence_set(), uid=True)
    if word == "NOT":
        r.sp()
        return c.SearchNot(_search_key(r, depth + 1))
    if word == "OR":
        r.sp()
        left = _search_key(r, depth + 1)
        r.sp()
        return c.SearchOr(left, _search_key(r, depth + 1))
    if word in ("EMAILID", "THREADID"):  # RFC 8474 section 6
        r.sp()
        value = r.atom("an object id")
        if not _OBJECTID.fullmatch(value):
            raise _Bad("Invalid object id")  # RFC 8474 section 3: objectid syntax
        return c.SearchObjectId(word, value)
    if word == "MODSEQ":  # RFC 7162 section 3.1.5
        r.sp()
        if r.peek() == 0x22:  # optional entry-name and entry-type-req
            r.string_bytes()
            r.sp()
            r.atom("an entry type")
            r.sp()
        return c.SearchModSeq(r.number(MAX_NUMBER64))
    raise _Bad(f"Unknown search key {word}")


# RFC 4731 3.1, RFC 5182 2.1; RFC 5267 section 4.1: CONTEXT, UPDATE, PARTIAL.
_SEARCH_RETURNS = ("MIN", "MAX", "ALL", "COUNT", "SAVE", "CONTEXT", "UPDATE", "PARTIAL")
# RFC 5267 sections 3 and 4.1 (ESORT, CONTEXT=SORT).
_SORT_RETURNS = ("MIN", "MAX", "ALL", "COUNT", "CONTEXT", "UPDATE", "PARTIAL")
# RFC 9394 section 5: partial-range-first = nz-number ":" nz-number,
# partial-range-last = "-" nz-number ":" "-" nz-number (RFC 5267 section 5
# had only the first form). Ten digits at most: MAX_NUMBER has ten.
_PARTIAL_RANGE = re.compile(rb"(-?)([0-9]{1,10}):(-?)([0-9]{1,10})(?![0-9:])")
# RFC 5267 section 5: "CANCELUPDATE" 1*(SP quoted).
_QUOTED_ONLY = 0x22
# RFC 5267 section 4.3.5: tags one CANCELUPDATE may name (a session keeps few contexts).
_MAX_CANCEL_TAGS = 100
# RFC 5256 section 3; RFC 5957 section 3 (DISPLAYFROM, DISPLAYTO).
SORT_KEYS = frozenset(
    {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
)
THREAD_ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")


def _partial_range(r: _Reader) -> tuple[int, int]:
    """RFC 9394 section 5 partial-range: both ends positive (1 is the first
    result) or both negative (-1 is the last); never 0, "*" or a mix."""
    m = r.match(_PARTIAL_RANGE)
    if not m or m.group(1) != m.group(3):
        raise _Bad("Invalid PARTIAL range")
    first, last = int(m.group(2)), int(m.group(4))
    if not (0 < first <= MAX_NUMBER and 0 < last <= MAX_NUMBER):
        raise _Bad("PARTIAL range out of range")
    sign = -1 if m.group(1) else 1
    return sign * first, sign * last


def _return_options(
    r: _Reader, allowed: tuple[str, ...]
) -> tuple[tuple[str, ...] | None, tuple[int, int] | None]:
    """``RETURN (opt ...) SP`` if present (RFC 4466 section 2.6), and the
    PARTIAL range among them. RFC 5267 section 4.4 (RFC 9394 section 3.1):
    one PARTIAL or one ALL at most, never both."""
    if r.buf[r.pos : r.pos + 7].upper() != b"RETURN ":
        return None, None
    r.pos += 7
    partial: list[tuple[int, int]] = []

    def option() -> str:
        opt = r.atom("a RETURN option").upper()
        if opt not in allowed:
            raise _Bad(f"Unknown RETURN option {opt[:40]}")
        if opt == "PARTIAL":
            r.sp()
            partial.append(_partial_range(r))
        return opt

    returns = tuple(str(x) for x in r.paren_list(option))
    if len(partial) + returns.count("ALL") > 1:
        raise _Bad("At most one of PARTIAL and ALL")
    r.sp()
    return returns, partial[0] if partial else None


def _search_keys(r: _Reader) -> c.SearchKey:
    """1*(SP search-key) up to the end of the command, ANDed."""
    keys = [_search_key(r, 0)]
    while not r.at_end():
        r.sp()
        keys.append(_search_key(r, 0))
    return keys[0] if len(keys) == 1 else c.SearchAnd(tuple(keys))


def _p_search(r: _Reader, tag: str, name: str) -> c.Command:
    uid = name.startswith("UID ")
    r.sp()
    charset = None
    returns, partial = _return_options(r, _SEARCH_RETURNS)
    if r.buf[r.pos : r.pos + 8].upper() == b"CHARSET ":
        r.pos += 8
        charset = r.astring().upper()
        r.sp()
    key = _search_keys(r)
    return c.Search(
        tag=tag, name=name, key=key, uid=uid, charset=charset, returns=returns, partial=partial
    )


def _sort_criterion(r: _Reader) -> tuple[str, bool]:
    """sort-criterion = ["REVERSE" SP] sort-key (RFC 5256 section 5)."""
    word = r.atom("a sort key").upper()
    reverse = word == "REVERSE"
    if reverse:
        r.sp()
        word = r.atom("a sort key").upper()
    if word not in SORT_KEYS:
        raise _Bad(f"Unknown sort key {word[:40]}")
    return word, reverse


def _p_sort(r: _Reader, tag: str, name: str) -> c.Command:
    """sort = ["UID" SP] "SORT" [SP sort-return-opts] SP sort-criteria SP
    search-criteria (RFC 5256 section 5, RFC 5267 section 3)."""
    r.sp()
    returns, partial = _return_options(r, _SORT_RETURNS)
    criteria = r.paren_list(lambda: _sort_criterion(r))
    if not criteria:
        raise _Bad("Empty sort criteria")
    r.sp()
    charset = r.astring().upper()  # search-criteria = charset 1*(SP search-key)
    r.sp()
    key = _search_keys(r)
    return c.Sort(
        tag=tag,
        name=name,
        criteria=tuple(criteria),  # type: ignore[arg-type]
        key=key,
        uid=name.startswith("UID "),
        charset=charset,
        returns=returns,
        partial=partial,
    )


def _p_cancelupdate(r: _Reader, tag: str, name: str) -> c.Command:
    """RFC 5267 section 5: "CANCELUPDATE" 1*(SP quoted)."""
    tags: list[str] = []
    while not r.at_end():
        r.sp()
        if r.peek() != _QUOTED_ONLY:
            raise _Bad("Expected a quoted tag")
        tags.append(_text(r.string_bytes()))
        if len(tags) > _MAX_CANCEL_TAGS:
            raise _Bad("Too many tags")
    if not tags:
        raise _Bad("Missing argument")
    return c.CancelUpdate(tag=tag, name=name, tags=tuple(tags))


def _p_thread(r: _Reader, tag: str, name: str) -> c.Command:
    """thread = ["UID" SP] "THREAD" SP thread-alg SP search-criteria."""
    r.sp()
    algorithm = r.atom("a threading algorithm").upper()
    if algorithm not in THREAD_ALGORITHMS:
        raise _Bad(f"Unknown threading algorithm {algorithm[:40]}")
    r.sp()
    charset = r.astring().upper()
    r.sp()
    key = _search_keys(r)
    return c.Thread(
        tag=tag,
        name=name,
        algorithm=algorithm,
        key=key,
        uid=name.startswith("UID "),
        charset=charset,
    )


def _section(r: _Reader) -> c.Section:
    """After "[": section-spec "]"."""
    part: tuple[int, ...] = ()
    m = r.match(_SECTION_PART)
    if m:
        part = tuple(int(x) for x in m.group().split(b"."))
        if r.peek() == 0x5D:
            r.pos += 1
            return c.Section(part)
        r.char(0x2E, ". or ]")
    if r.peek() == 0x5D:
        if part:
            raise _Bad("Invalid section")
        r.pos += 1
        return c.Section()
    m = r.match(_SECTION_TEXT)
    if not m:
        raise _Bad("Invalid section")
    text = m.group().decode().upper()
    if text == "MIME" and not part:
        raise _Bad("MIME needs a part number")
    fields: tuple[str, ...] = ()
    if text.startswith("HEADER.FIELDS"):
        r.sp()
        fields = tuple(str(x) for x in r.paren_list(r.astring))
        if not fields:
            raise _Bad("Empty header list")
    r.char(0x5D, "]")
    return c.Section(part, text, fields)


def _fetch_att(r: _Reader) -> c.FetchAttribute:
    m = r.match(_FETCH_SECTIONED)
    if m:
        kind = m.group(1).decode().upper()
        peek = kind.endswith(".PEEK")
        base = kind.removesuffix(".PEEK")
        section = _section(r)
        if base != "BODY" and section.text is not None:
            raise _Bad("BINARY takes part numbers only")  # RFC 3516 section 4.2
        partial = None
        pm = r.match(_PARTIAL)
        if pm:
            if base == "BINARY.SIZE":
                raise _Bad("BINARY.SIZE takes no partial")
            partial = (int(pm.group(1)), int(pm.group(2)))
        return c.FetchAttribute(base, section, partial, peek)
    word = r.atom("a fetch item").upper()
    if word == "PREVIEW":
        return _preview_att(r)
    if word not in _SIMPLE_FETCH:
        raise _Bad(f"Unknown fetch item {word}")
    return c.FetchAttribute(word)


_PREVIEW_MODS = re.compile(rb" \((LAZY(?: LAZY)*)\)", re.I)


def _preview_att(r: _Reader) -> c.FetchAttribute:
    """RFC 8970 section 6: "PREVIEW" [SP "(" preview-mod *(SP preview-mod)
    ")"], preview-mod = "LAZY". LAZY lets the server answer NIL when the
    preview is not at hand; ours always is, so it changes nothing. (A
    parenthesised list after a lone PREVIEW that is not LAZY is left to be
    read as fetch modifiers.)"""
    r.match(_PREVIEW_MODS)
    return c.FetchAttribute("PREVIEW")


def _p_fetch(r: _Reader, tag: str, name: str) -> c.Command:
    uid = name.startswith("UID ")
    r.sp()
    seq = r.sequence_set()
    r.sp()
    atts: list[c.FetchAttribute]
    if r.peek() == 0x28:
        atts = r.paren_list(lambda: _fetch_att(r))  # type: ignore[assignment]
        if not atts:
            raise _Bad("Empty fetch list")
    else:
        save = r.pos
        m = r.match(_ATOM)
        word = m.group().decode().upper() if m else ""
        if word in FETCH_MACROS:
            atts = [c.FetchAttribute(x) for x in FETCH_MACROS[word]]
        else:
            r.pos = save
            atts = [_fetch_att(r)]
    changed_since = None
    vanished = False
    if r.try_sp():  # RFC 4466 fetch-modifiers
        r.char(0x28, "(")
        while True:
            mod = r.atom("a fetch modifier").upper()
            if mod == "CHANGEDSINCE":
                r.sp()
                changed_since = r.number(MAX_NUMBER64)
            elif mod == "VANISHED" and uid:
                vanished = True
            else:
                raise _Bad(f"Unknown fetch modifier {mod}")
            if r.peek() == 0x29:
                r.pos += 1
                break
            r.sp()
        if vanished and changed_since is None:
            raise _Bad("VANISHED needs CHANGEDSINCE")  # RFC 7162 section 3.2.6
    r.expect_end()
    return c.Fetch(
        tag=tag,
        name=name,
        sequence=seq,
        attributes=tuple(atts),
        uid=uid,
        changed_since=changed_since,
        vanished=vanished,
    )


def _p_store(r: _Reader, tag: str, name: str) -> c.Command:
    uid = name.startswith("UID ")
    r.sp()
    seq = r.sequence_set()
    r.sp()
    unchanged = None
    if r.peek() == 0x28:  # RFC 7162 section 3.1.3 (UNCHANGEDSINCE n)
        r.pos += 1
        if r.atom("UNCHANGEDSINCE").upper() != "UNCHANGEDSINCE":
            raise _Bad("Unknown store modifier")
        r.sp()
        unchanged = r.number(MAX_NUMBER64)
        r.char(0x29, ")")
        r.sp()
    m = r.match(_STORE_ITEM)
    if not m:
        raise _Bad("Expected FLAGS, +FLAGS or -FLAGS")
    mode = {b"": "replace", b"+": "add", b"-": "remove"}[m.group(1)]
    silent = bool(m.group(2))
    r.sp()
    if r.peek() == 0x28:
        flags = _flag_list(r)
    else:
        flags_l = [_flag(r)]
        while r.try_sp():
            flags_l.append(_flag(r))
        flags = tuple(flags_l)
    r.expect_end()
    return c.Store(
        tag=tag,
        name=name,
        sequence=seq,
        mode=mode,
        silent=silent,
        flags=flags,
        uid=uid,
        unchanged_since=unchanged,
    )


def _p_copy(r: _Reader, tag: str, name: str) -> c.Command:
    uid = name.startswith("UID ")
    r.sp()
    seq = r.sequence_set()
    r.sp()
    mailbox = r.mailbox()
    r.expect_end()
    return c.Copy(tag=tag, name=name, sequence=seq, mailbox=mailbox, uid=uid)


def _p_uid_expunge(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    seq = r.sequence_set()
    r.expect_end()
    return c.UidExpunge(tag=tag, name=name, sequence=seq)


def _p_id(r: _Reader, tag: str, name: str) -> c.Command:
    r.sp()
    if r.peek() != 0x28:
        if r.atom("NIL").upper() != "NIL":
            raise _Bad("Expected NIL or a parameter list")
        r.expect_end()
        return c.Id(tag=tag, name=name, params=None)
    r.pos += 1
    params: list[tuple[str, str | None]] = []
    while r.peek() != 0x29:
        key = _text(r.string_bytes())
        r.sp()
        params.append((key, r.nstring()))
        if r.peek() != 0x29:
            r.sp()
        if len(params) > 30:  # RFC 2971 section 3.3
            raise _Bad("Too many ID parameters")
    r.pos += 1
    r.expect_end()
    return c.Id(tag=tag, name=name, params=tuple(params))


def _p_enable(r: _Reader, tag: str, name: str) -> c.Command:
    caps = []
    while r.try_sp():
        caps.append(r.atom("a capability").upper())
    if not caps:
        raise _Bad("ENABLE needs a capability")
    r.expect_end()
    return c.Enable(tag=tag, name=name, capabilities=tuple(caps))


# RFC 9208 section 7 (formal syntax): number64 resource limits.
_MAX_NUMBER64 = 2**63 - 1


def _p_quota(r: _Reader, tag: str, name: str) -> c.Command:
    """RFC 9208 section 7: "GETQUOTA" SP quota-root-name,
    "GETQUOTAROOT" SP mailbox, "SETQUOTA" SP quota-root-name SP setquota_list."""
    r.sp()
    if name == "GETQUOTAROOT":
        root = r.mailbox()
    else:
        root = r.astring()
    limits: list[tuple[str, int]] = []
    if name == "SETQUOTA":
        r.sp()

        def resource() -> tuple[str, int]:
            res = r.atom("a resource name").upper()
            r.sp()
            return res, r.number(_MAX_NUMBER64)

        limits = [x for x in r.paren_list(resource) if isinstance(x, tuple)]
    r.expect_end()
    return c.Quota(tag=tag, name=name, root=root, limits=tuple(limits))


def _p_compress(r: _Reader, tag: str, name: str) -> c.Command:
    """RFC 4978 section 5: "COMPRESS" SP algorithm (an atom)."""
    r.sp()
    mechanism = r.atom("a compression mechanism").upper()
    r.expect_end()
    return c.Compress(tag=tag, name=name, mechanism=mechanism)


# RFC 5464 section 3.2.1: an entry name is a slash-separated path under
# /private or /shared, printable ASCII without the LIST wildcards, no empty
# component, no trailing slash. Entry names are case-insensitive.
_ENTRY = re.compile(r"/(?:private|shared)(?:/[\x21-\x24\x26-\x29\x2b-\x2e\x30-\x7e]+)*", re.I)
MAX_ENTRY_NAME = 1024  # octets, the stored column's size
MAX_METADATA_ENTRIES = 200  # entries named in one command


def _entry_name(r: _Reader, setting: bool) -> str:
    """entry = astring (RFC 5464 section 5), checked against section
    3.2.1; the bare "/private" and "/shared" only name a subtree to read."""
    name = _text(r.astring_bytes())
    if len(name) > MAX_ENTRY_NAME or not _ENTRY.fullmatch(name):
        raise _Bad("Invalid metadata entry name")
    name = name.lower()
    if setting and name in ("/private", "/shared"):
        raise _Bad("An entry name needs a component after /private or /shared")
    return name


def _p_getmetadata(r: _Reader, tag: str, name: str) -> c.Command:
    """getmetadata = "GETMETADATA" [SP getmetadata-options] SP mailbox SP
    entries; options MAXSIZE number, DEPTH ("0" / "1" / "infinity")
    (RFC 5464 section 5)."""
    r.sp()
    maxsize: int | None = None
    depth: str | None = None
    if r.peek() == 0x28:
        r.pos += 1
        while True:
            option = r.atom("a GETMETADATA option").upper()
            r.sp()
            if option == "MAXSIZE" and maxsize is None:
                maxsize = r.number()
            elif option == "DEPTH" and depth is None:
                depth = r.atom("a depth").lower()
                if depth not in ("0", "1", "infinity"):
                    raise _Bad("DEPTH is 0, 1 or infinity")
            else:
                raise _Bad(f"Unknown or repeated GETMETADATA option {option[:40]}")
            if r.peek() == 0x29:
                r.pos += 1
                break
            r.sp()
        r.sp()
    mailbox = r.mailbox()
    r.sp()
    if r.peek() == 0x28:
        entries = [str(e) for e in r.paren_list(lambda: _entry_name(r, False))]
        if not entries:
            raise _Bad("No entries")
    else:
        entries = [_entry_name(r, False)]
    if len(entries) > MAX_METADATA_ENTRIES:
        raise _Bad(f"At most {MAX_METADATA_ENTRIES} entries at once")
    r.expect_end()
    return c.GetMetadata(
        tag=tag,
        name=name,
        mailbox=mailbox,
        entries=tuple(dict.fromkeys(entries)),
        maxsize=maxsize,
        depth=depth or "0",
    )


def _metadata_value(r: _Reader) -> bytes | None:
    """value = nstring / literal8 (RFC 5464 section 5)."""
    if r.buf[r.pos : r.pos + 3].upper() == b"NIL" and not _ATOM.match(r.buf, r.pos + 3):
        r.pos += 3
        return None
    if r.peek() == 0x7E:  # RFC 3516 literal8: "~{n}"
        r.pos += 1
        if r.peek() != 0x7B:
            raise _Bad("Expected a literal8")
    return r.string_bytes()


def _p_setmetadata(r: _Reader, tag: str, name: str) -> c.Command:
    """setmetadata = "SETMETADATA" SP mailbox SP entry-values;
    entry-values = "(" entry-value *(SP entry-value) ")";
    entry-value = entry SP value (RFC 5464 section 5)."""
    r.sp()
    mailbox = r.mailbox()
    r.sp()

    def pair() -> tuple[str, bytes | None]:
        entry = _entry_name(r, True)
        r.sp()
        return entry, _metadata_value(r)

    values = r.paren_list(pair)
    if not values:
        raise _Bad("No entries")
    if len(values) > MAX_METADATA_ENTRIES:
        raise _Bad(f"At most {MAX_METADATA_ENTRIES} entries at once")
    r.expect_end()
    return c.SetMetadata(tag=tag, name=name, mailbox=mailbox, values=tuple(values))  # type: ignore[arg-type]


def _p_notify(r: _Reader, tag: str, name: str) -> c.Command:
    from imapd.imap.wire.notify_syntax import parse_notify

    return parse_notify(r, tag, name)


def _p_acl(r: _Reader, tag: str, name: str) -> c.Command:
    """RFC 4314 section 7: "SETACL" SP mailbox SP identifier SP mod-rights,
    "DELETEACL" / "LISTRIGHTS" SP mailbox SP identifier, "GETACL" /
    "MYRIGHTS" SP mailbox; identifier and mod-rights are astrings."""
    r.sp()
    mailbox = r.mailbox()
    identifier = rights = None
    if name in ("SETACL", "DELETEACL", "LISTRIGHTS"):
        r.sp()
        identifier = r.astring()
        if not identifier:
            raise _Bad("Empty identifier")
    if name == "SETACL":
        r.sp()
        rights = r.astring()
    r.expect_end()
    return c.Acl(tag=tag, name=name, mailbox=mailbox, identifier=identifier, rights=rights)


_PARSERS: dict[str, Callable[[_Reader, str, str], c.Command]] = {
    **{
        n: _p_simple
        for n in (
            "CAPABILITY",
            "NOOP",
            "LOGOUT",
            "STARTTLS",
            "CHECK",
            "CLOSE",
            "EXPUNGE",
            "IDLE",
            "NAMESPACE",
            "UNSELECT",
        )
    },
    "AUTHENTICATE": _p_authenticate,
    "LOGIN": _p_login,
    "SELECT": _p_select,
    "EXAMINE": _p_select,
    "CREATE": _p_mailbox,
    "DELETE": _p_mailbox,
    "SUBSCRIBE": _p_mailbox,
    "UNSUBSCRIBE": _p_mailbox,
    "RENAME": _p_rename,
    "LIST": _p_list,
    "LSUB": _p_list,
    "STATUS": _p_status,
    "APPEND": _p_append,
    "SEARCH": _p_search,
    "FETCH": _p_fetch,
    "STORE": _p_store,
    "COPY": _p_copy,
    "MOVE": _p_copy,
    "ID": _p_id,
    "ENABLE": _p_enable,
    "GETQUOTA": _p_quota,  # RFC 9208 section 4.1
    "GETQUOTAROOT": _p_quota,
    "SETQUOTA": _p_quota,
    "COMPRESS": _p_compress,  # RFC 4978
    "GETMETADATA": _p_getmetadata,  # RFC 5464 section 4.2
    "SETMETADATA": _p_setmetadata,  # RFC 5464 section 4.3
    "NOTIFY": _p_notify,  # RFC 5465 section 3
    **{n: _p_acl for n in ("SETACL", "DELETEACL", "GETACL", "LISTRIGHTS", "MYRIGHTS")},
    "UID SEARCH": _p_search,
    "SORT": _p_sort,
    "UID SORT": _p_sort,
    "THREAD": _p_thread,
    "UID THREAD": _p_thread,
    "UID FETCH": _p_fetch,
    "UID STORE": _p_store,
    "UID COPY": _p_copy,
    "UID MOVE": _p_copy,
    "UID EXPUNGE": _p_uid_expunge,
    "CANCELUPDATE": _p_cancelupdate,  # RFC 5267 section 4.3.5
}

COMMAND_NAMES = frozenset(_PARSERS)


def parse_command(
    segments: Sequence[bytes], literals: Sequence[object] = (), utf8: bool = False
) -> c.Command | c.ParseError:
    """Parse one framed command. Never raises. ``utf8``: the client
    enabled UTF8=ACCEPT (RFC 6855): mailbox names are UTF-8, and APPEND
    takes its UTF8 (...) form."""
    if not segments:
        return c.ParseError("*", "Empty command")
    r = _Reader(segments, literals, utf8)
    m = r.match(_TAG)
    if not m or r.peek() != 0x20:
        return c.ParseError("*", "Missing or invalid tag")
    tag = m.group().decode("ascii")
    try:
        r.pos += 1
        name = r.atom("a command name").upper()
        if name == "UID":
            r.sp()
            name = "UID " + r.atom("a command name").upper()
        parser = _PARSERS.get(name)
        if parser is None:
            return c.ParseError(tag, f"Unknown command {name[:40]}")
        return parser(r, tag, name)
    except _Bad as exc:
        return c.ParseError(tag, str(exc), exc.code)
    except Exception as exc:  # defensive: a parser bug must not end the session with BYE
        return c.ParseError(tag, f"Malformed command ({type(exc).__name__})")


def parse_line(line: bytes, utf8: bool = False) -> c.Command | c.ParseError:
    """Convenience for tests: parse a command given as one buffer that may
    contain ``{n}\\r\\n`` literals inline (no CRLF at the end needed)."""
    segments: list[bytes] = []
    literals: list[object] = []
    pos = 0
    marker = re.compile(rb"\{(\d+)\+?\}\r\n")
    while True:
        m = marker.search(line, pos)
        if not m:
            segments.append(line[pos:].removesuffix(b"\r\n"))
            break
        segments.append(line[pos : m.end() - 2])
        size = int(m.group(1))
        literals.append(line[m.end() : m.end() + size])
        pos = m.end() + size
    return parse_command(segments, literals, utf8)
