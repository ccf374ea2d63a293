"""The pure IMAP wire layer: framing, parsing, encoding, modified UTF-7."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imapd.imap.wire import commands as c
from imapd.imap.wire import encode
from imapd.imap.wire.framing import (
    FrameError,
    Framer,
    LiteralBegin,
    LiteralChunk,
    TextSegment,
)
from imapd.imap.wire.parser import parse_command, parse_line, parse_sequence_set
from imapd.imap.wire.utf7 import Utf7Error, decode_mailbox, encode_mailbox
from storage.model import Address, BodyPart, Envelope
from tests.linearity import best_time

# ---------------------------------------------------------------- parser table

PARSES = [
    (b"a1 CAPABILITY", c.Simple(tag="a1", name="CAPABILITY")),
    (b"a2 noop", c.Simple(tag="a2", name="NOOP")),
    (b'a3 LOGIN "joe" "p\\"w"', c.Login(tag="a3", name="LOGIN", username="joe", password='p"w')),
    (b"a4 LOGIN {3}\r\njoe {2}\r\npw", c.Login(tag="a4", name="LOGIN", username="joe",
                                            password="pw")),
    (b"a5 AUTHENTICATE PLAIN AGpvZQBwdw==",
     c.Authenticate(tag="a5", name="AUTHENTICATE", mechanism="PLAIN",
                    initial_response=b"AGpvZQBwdw==")),
    (b"a6 SELECT inbox", c.Select(tag="a6", name="SELECT", mailbox="INBOX")),
    (b"a7 EXAMINE &ZeVnLIqe- (CONDSTORE)",
     c.Select(tag="a7", name="EXAMINE", mailbox="日本語", condstore=True)),
    (b"a8 RENAME a b", c.Rename(tag="a8", name="RENAME", old="a", new="b")),
    (b"a9 STATUS INBOX (MESSAGES UNSEEN)",
     c.Status(tag="a9", name="STATUS", mailbox="INBOX", items=("MESSAGES", "UNSEEN"))),
    (b"b1 UID EXPUNGE 1:3", c.UidExpunge(tag="b1", name="UID EXPUNGE",
                                         sequence=c.SequenceSet(((1, 3),)))),
    (b"b2 ENABLE QRESYNC condstore",
     c.Enable(tag="b2", name="ENABLE", capabilities=("QRESYNC", "CONDSTORE"))),
    (b"b3 ID NIL", c.Id(tag="b3", name="ID", params=None)),
    (b"b4 UID COPY 1:* Trash", c.Copy(tag="b4", name="UID COPY",
                                      sequence=c.SequenceSet(((1, None),)), mailbox="Trash",
                                      uid=True)),
    (b"b5 STORE 2 -FLAGS.SILENT \\Seen $Junk",
     c.Store(tag="b5", name="STORE", sequence=c.SequenceSet(((2, 2),)), mode="remove",
             silent=True, flags=("\\Seen", "$Junk"), uid=False)),
]


@pytest.mark.parametrize(("line", "expected"), PARSES)
def test_parses(line: bytes, expected: c.Command) -> None:
    assert parse_line(line) == expected


BAD = [
    (b"", "*"),
    (b"* NOOP", "*"),
    (b"a1", "*"),
    (b"a1 FROB", "a1"),
    (b"a1 NOOP extra", "a1"),
    (b"a1 FETCH 0 FLAGS", "a1"),
    (b"a1 FETCH 1 (FLAGS", "a1"),
    (b"a1 FETCH 1 BODY[1.0]", "a1"),
    (b"a1 FETCH 1 BOGUS", "a1"),
    (b"a1 STORE 1 +FLAGS (\\Recent)", "a1"),
    (b"a1 SEARCH FROBNICATE", "a1"),
    (b"a1 SEARCH SINCE 31-Feb-2020", "a1"),
    (b"a1 APPEND INBOX", "a1"),
    (b'a1 LOGIN "unterminated', "a1"),
    (b"a1 SELECT &Jjo", "a1"),
    (b"a1 SEARCH " + b"(" * 100 + b"ALL" + b")" * 100, "a1"),
    (b"a1 SEARCH " + b"NOT " * 100 + b"ALL", "a1"),
    (b"a1 FETCH 4294967296 FLAGS", "a1"),
]


@pytest.mark.parametrize(("line", "tag"), BAD)
def test_bad_commands_give_parse_errors(line: bytes, tag: str) -> None:
    result = parse_line(line)
    assert isinstance(result, c.ParseError)
    assert result.tag == tag
    assert result.message


def test_fetch_items_and_macros() -> None:
    cmd = parse_line(b"a UID FETCH 1:5,9 (BODY.PEEK[1.2.HEADER.FIELDS.NOT (X-A \"X B\")]<10.20>"
                     b" BODY[] RFC822.SIZE BODY[2.MIME]) (CHANGEDSINCE 12345 VANISHED)")
    assert isinstance(cmd, c.Fetch)
    first = cmd.attributes[0]
    assert first.peek and first.partial == (10, 20)
    assert first.section == c.Section((1, 2), "HEADER.FIELDS.NOT", ("X-A", "X B"))
    assert first.section.label() == '1.2.HEADER.FIELDS.NOT (X-A "X B")'
    assert cmd.attributes[1].section == c.Section()
    assert cmd.attributes[3].section == c.Section((2,), "MIME")
    assert cmd.changed_since == 12345 and cmd.vanished and cmd.uid
    full = parse_line(b"a FETCH 1 FULL")
    assert isinstance(full, c.Fetch)
    assert [a.name for a in full.attributes] == [
        "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]
    assert [a.name for a in parse_line(b"a FETCH * FAST").attributes] == [  # type: ignore
        "FLAGS", "INTERNALDATE", "RFC822.SIZE"]


def test_search_keys() -> None:
    cmd = parse_line(b'a SEARCH CHARSET UTF-8 OR (FROM "x y" UNSEEN) NOT 2:4 '
                     b"HEADER X-Spam yes LARGER 100 SENTBEFORE \"1-Jan-2020\" UID 5:* "
                     b"KEYWORD $Work NEW OLD MODSEQ 7 BODY {4}\r\ntext")
    assert isinstance(cmd, c.Search) and cmd.charset == "UTF-8"
    keys = cmd.key.keys  # type: ignore[union-attr]
    assert keys[0] == c.SearchOr(
        c.SearchAnd((c.SearchHeader("from", "x y"), c.SearchFlag("\\Seen", False))),
        c.SearchNot(c.SearchSequence(c.SequenceSet(((2, 4),)), False)),
    )
    assert keys[1] == c.SearchHeader("x-spam", "yes")
    assert keys[2] == c.SearchSize("larger", 100)
    assert keys[3] == c.SearchDate("sent", "before", dt.date(2020, 1, 1))
    assert keys[4] == c.SearchSequence(c.SequenceSet(((5, None),)), True)
    assert keys[5] == c.SearchFlag("$Work", True)
    assert keys[8] == c.SearchModSeq(7)
    assert keys[9] == c.SearchText("body", "text")
    es = parse_line(b"a UID SEARCH RETURN (MIN COUNT) ALL")
    assert isinstance(es, c.Search) and es.returns == ("MIN", "COUNT") and es.uid


def test_append_with_date_and_flags() -> None:
    cmd = parse_line(b'a APPEND Sent (\\Seen \\Draft) " 5-Mar-2021 10:11:12 -0130" {3+}\r\nabc')
    assert isinstance(cmd, c.Append)
    assert cmd.flags == ("\\Seen", "\\Draft")
    assert cmd.internal_date == dt.datetime(
        2021, 3, 5, 10, 11, 12, tzinfo=dt.timezone(-dt.timedelta(hours=1, minutes=30)))
    assert cmd.message == b"abc"


def test_list_extended() -> None:
    cmd = parse_line(b'a LIST (SUBSCRIBED) "" ("INBOX" "Lists/%") RETURN (CHILDREN STATUS '
                     b"(MESSAGES UNSEEN))")
    assert cmd == c.ListCommand(tag="a", name="LIST", reference="",
                                patterns=("INBOX", "Lists/%"), selection=("SUBSCRIBED",),
                                returns=("CHILDREN", "STATUS"),
                                status_items=("MESSAGES", "UNSEEN"))


def test_select_qresync() -> None:
    cmd = parse_line(b"a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211 "
                     b"(1,3 41,43)))")
    assert isinstance(cmd, c.Select) and cmd.qresync is not None
    assert cmd.qresync.uidvalidity == 67890007 and cmd.qresync.modseq == 20050715194045000
    assert cmd.qresync.known_uids == c.SequenceSet(((41, 41), (43, 211)))


# ------------------------------------------------------------- sequence sets

def test_sequence_set_forms() -> None:
    assert parse_sequence_set(b"1,3:5,*,7:*") == c.SequenceSet(
        ((1, 1), (3, 5), (None, None), (7, None)))
    assert str(parse_sequence_set(b"1,3:5,*")) == "1,3:5,*"


def _uid_set(n: int) -> bytes:
    return b"a UID FETCH " + b",".join(b"%d" % (i * 2 + 1) for i in range(n)) + b" FLAGS"


def test_sequence_set_parses_in_linear_time() -> None:
    small, large = _uid_set(10_000), _uid_set(100_000)
    cmd = parse_command([large])
    assert isinstance(cmd, c.Fetch) and len(cmd.sequence.ranges) == 100_000
    ratio = best_time(lambda: parse_command([large])) / best_time(lambda: parse_command([small]))
    assert ratio < 25, f"10x input took {ratio:.1f}x the time"


# ------------------------------------------------------------------- framing

def _drain(f: Framer) -> list[object]:
    out = []
    while (ev := f.next_event()) is not None:
        out.append(ev)
        if isinstance(ev, LiteralBegin):
            f.accept()
    return out


def test_framer_byte_by_byte_with_literals() -> None:
    f = Framer()
    events: list[object] = []
    for b in b"a LOGIN {3}\r\njoe {2+}\r\npw\r\nb NOOP\r\n":
        f.feed(bytes([b]))
        events += _drain(f)
    texts = [e for e in events if isinstance(e, TextSegment)]
    assert [t.data for t in texts] == [b"a LOGIN {3}", b" {2+}", b"", b"b NOOP"]
    assert [t.final for t in texts] == [False, False, True, True]
    lits = b"".join(e.data for e in events if isinstance(e, LiteralChunk))
    assert lits == b"joepw"
    begins = [e for e in events if isinstance(e, LiteralBegin)]
    assert begins == [LiteralBegin(3, True), LiteralBegin(2, False)]


def test_framer_line_too_long_then_recovers() -> None:
    f = Framer(max_line_length=100)
    f.feed(b"t1 NOOP " + b"x" * 200)
    ev = f.next_event()
    assert isinstance(ev, FrameError) and ev.tag == "t1"
    f.feed(b"yyy\r\nt2 NOOP\r\n")
    assert f.next_event() == TextSegment(b"t2 NOOP", True)


def test_framer_rejected_nonsync_literal_is_discarded() -> None:
    f = Framer()
    f.feed(b"a APPEND INBOX {5+}\r\nhello rest {3+}\r\nabc\r\nb NOOP\r\n")
    assert f.next_event() == TextSegment(b"a APPEND INBOX {5+}", False)
    assert f.next_event() == LiteralBegin(5, False)
    f.reject(False)
    assert f.next_event() == TextSegment(b"b NOOP", True)


def test_framer_rejected_sync_literal() -> None:
    f = Framer()
    f.feed(b"a APPEND INBOX {99999}\r\n")
    assert isinstance(f.next_event(), TextSegment)
    assert f.next_event() == LiteralBegin(99999, True)
    f.reject(True)
    f.feed(b"b NOOP\r\n")
    assert f.next_event() == TextSegment(b"b NOOP", True)


def test_framer_clear_drops_buffered_plaintext() -> None:
    f = Framer()
    f.feed(b"a STARTTLS\r\nb LOGIN x y\r\n")
    assert f.next_event() == TextSegment(b"a STARTTLS", True)
    f.clear()
    assert f.next_event() is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_framer_and_parser_never_crash(data: bytes, chunk: int) -> None:
    f = Framer(max_line_length=128)
    segments: list[bytes] = []
    literals: list[object] = []
    lit = bytearray()
    for i in range(0, len(data), chunk):
        f.feed(data[i : i + chunk])
        while (ev := f.next_event()) is not None:
            if isinstance(ev, LiteralBegin):
                if ev.size > 50:
                    f.reject(ev.synchronizing)
                    segments, literals = [], []
                else:
                    f.accept()
            elif isinstance(ev, LiteralChunk):
                lit += ev.data
                if ev.last:
                    literals.append(bytes(lit))
                    lit.clear()
            elif isinstance(ev, TextSegment):
                segments.append(ev.data)
                if ev.final:
                    result = parse_command(segments, literals)
                    assert isinstance(result, c.Command | c.ParseError)
                    segments, literals = [], []
            else:
                assert isinstance(ev, FrameError)
                segments, literals = [], []


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_parser_never_crashes_on_arbitrary_bytes(data: bytes) -> None:
    for line in (data, b"a " + data, b"a UID FETCH " + data, b"a SEARCH " + data):
        result = parse_command([line.replace(b"\r", b"").replace(b"\n", b"")])
        assert isinstance(result, c.Command | c.ParseError)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    b"1", b"*", b"1:*", b"(", b")", b"ALL", b"OR", b"NOT", b"BODY", b"\"x\"", b"UID",
    b"FLAGS", b"BODY[", b"]", b"HEADER.FIELDS", b"<1.2>", b"FROM", b"SINCE", b"1-Jan-2000",
    b"SEARCH", b"FETCH", b"STORE", b"+FLAGS", b"\\Seen", b"LIST", b"\"\"", b"%",
]), max_size=12))
def test_parser_never_crashes_on_token_soup(tokens: list[bytes]) -> None:
    result = parse_command([b"t " + b" ".join(tokens)])
    assert isinstance(result, c.Command | c.ParseError)


# --------------------------------------------------------------- modified UTF-7

UTF7 = [
    ("INBOX", "INBOX"),
    ("Entwürfe", "Entw&APw-rfe"),
    ("日本語", "&ZeVnLIqe-"),
    ("a&b", "a&-b"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ("😀", "&2D3eAA-"),
]


@pytest.mark.parametrize(("name", "wire"), UTF7)
def test_utf7_round_trip(name: str, wire: str) -> None:
    assert encode_mailbox(name) == wire
    assert decode_mailbox(wire) == name


@pytest.mark.parametrize("wire", ["&", "&Jjo", "&AGE-", "caf\u00e9", "&-&ZeVnLIqe"])
def test_utf7_rejects_malformed(wire: str) -> None:
    with pytest.raises(Utf7Error):
        decode_mailbox(wire)


# RFC 3501 section 5.1.3: only the one shortest encoding of a name is valid.
NON_CANONICAL_UTF7 = [
    "&ZZZ-",  # 18 bits for 16: the 2 padding bits must be zero
    "&AOP-x",  # the same, after one 16-bit unit
    "&AOl-",
    "&2D3eAB-",  # 36 bits for 32: 4 padding bits, one set
    "&AOk-&AOk-",  # two adjacent base64 runs are written as one: &AOkA6Q-
    "a&AOk-&AGEA4Q-",
    "&AOkA-",  # 24 bits: 3 octets, half a UTF-16 unit left over
    "&AA-",  # 12 bits: one octet
    "&2D0-",  # a high surrogate alone
    "&3gA-",  # a low surrogate alone
    "&ACY-",  # "&" is written "&-"
    "&AGEA6Q-",  # printable "a" inside the base64 run
]


@pytest.mark.parametrize("wire", NON_CANONICAL_UTF7)
def test_utf7_rejects_non_canonical(wire: str) -> None:
    with pytest.raises(Utf7Error):
        decode_mailbox(wire)


@given(st.text(alphabet="&-AOkDd3eZ,+Ga", max_size=16))
def test_utf7_accepts_only_the_canonical_form(wire: str) -> None:
    """Whatever decodes must be exactly what encoding the result gives."""
    try:
        name = decode_mailbox(wire)
    except Utf7Error:
        return
    assert encode_mailbox(name) == wire


@given(st.text(max_size=30))
def test_utf7_property(name: str) -> None:
    name = name.replace("\x00", "")
    wire = encode_mailbox(name)
    assert all(0x20 <= ord(ch) <= 0x7E for ch in wire)
    assert decode_mailbox(wire) == name


# ------------------------------------------------------------------- encoder

def test_string_quoting_and_literals() -> None:
    assert encode.string("abc") == b'"abc"'
    assert encode.string('a"b\\') == b'"a\\"b\\\\"'
    assert encode.string("a\r\nb") == b"{4}\r\na\r\nb"
    assert encode.string("é") == b"{2}\r\n\xc3\xa9"
    assert encode.nstring(None) == b"NIL"
    assert encode.mailbox("Entwürfe") == b'"Entw&APw-rfe"'
    assert encode.sequence_set([1, 2, 3, 5, 7, 8]) == b"1:3,5,7:8"


def test_internal_date() -> None:
    when = dt.datetime(2020, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=-8)))
    assert encode.internal_date(when) == b'"03-Feb-2020 04:05:06 -0800"'


def _part(**kw: object) -> BodyPart:
    base: dict[str, object] = dict(
        type="text", subtype="plain", params=(("charset", "us-ascii"),), id=None,
        description=None, encoding="7BIT", size=10, lines=2, md5=None, disposition=None,
        language=None, location=None, header_start=0, body_start=0, end=10)
    base.update(kw)
    return BodyPart(**base)  # type: ignore[arg-type]


def test_envelope_and_bodystructure() -> None:
    env = Envelope(date="Mon, 1 Jan 2020 00:00:00 +0000", subject="Hi",
                   from_=(Address("Joe", None, "joe", "x.org"),), sender=(), reply_to=(),
                   to=(Address(None, None, "ann", "y.org"),), cc=(), bcc=(),
                   in_reply_to=None, message_id="<1@x>")
    assert encode.envelope(env) == (
        b'("Mon, 1 Jan 2020 00:00:00 +0000" "Hi" (("Joe" NIL "joe" "x.org")) '
        b'(("Joe" NIL "joe" "x.org")) (("Joe" NIL "joe" "x.org")) ((NIL NIL "ann" "y.org")) '
        b'NIL NIL NIL "<1@x>")')
    att = _part(type="application", subtype="pdf", params=(("name", "a.pdf"),),
                encoding="BASE64", lines=None,
                disposition=("attachment", (("filename", "a.pdf"),)), language=("en",))
    mixed = _part(type="multipart", subtype="mixed", params=(("boundary", "b"),), lines=None,
                  children=(_part(), att))
    assert encode.body_structure(mixed, extended=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 10 2)'
        b'("APPLICATION" "PDF" ("NAME" "a.pdf") NIL NIL "BASE64" 10) "MIXED")')
    assert encode.body_structure(mixed, extended=True) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 10 2 NIL NIL NIL NIL)'
        b'("APPLICATION" "PDF" ("NAME" "a.pdf") NIL NIL "BASE64" 10 NIL '
        b'("attachment" ("FILENAME" "a.pdf")) "en" NIL) "MIXED" ("BOUNDARY" "b") NIL NIL NIL)')
    rfc822 = _part(type="message", subtype="rfc822", params=(), lines=5,
                   message_envelope=env, message_body=_part())
    out = encode.body_structure(rfc822, extended=False)
    assert out.startswith(b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 10 ("Mon')
    assert out.endswith(b'("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 10 2) 5)')
