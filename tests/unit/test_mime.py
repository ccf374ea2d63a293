"""storage.mime against the hand-checked fixture corpus in tests/fixtures/mime.

Each fixture has an expectation below: the body structure as a tree string,
the RFC 3501 ENVELOPE essentials, and per part (keyed by section path, ""
for the root, "2.m" for the message enclosed in part 2) the BODYSTRUCTURE
fields and the exact body bytes that ``raw[body_start:end]`` must give.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import email.policy
import re
from pathlib import Path
from typing import Any

import pytest

from storage.mime import (
    decode_charset,
    decode_words,
    html_to_text,
    parse_addresses,
    parse_message,
    parsed_from_json,
    parsed_to_json,
)
from storage.model import Address, BodyPart, ParsedMessage
from tests.fixtures.mime.large import ATTACHMENT_SIZE, large_message
from tests.fixtures.mime.make_corpus import PDF_TINY, PNG_1X1, b64, corpus

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mime"
ALICE = Address("Alice Example", None, "alice", "example.org")
BOB = Address("Bob", None, "bob", "example.net")
ALICE_PLAIN = Address(None, None, "alice", "example.org")
GROUP_END = Address(None, None, None, None)
US_ASCII = (("charset", "us-ascii"),)


def group(name: str) -> Address:
    return Address(None, None, name, None)


def std_env(name: str, subject: str) -> dict[str, Any]:
    """The envelope of fixtures built with make_corpus.head()."""
    return {
        "date": "Tue, 02 Jan 2024 10:00:00 +0100",
        "subject": subject,
        "from_": (ALICE,),
        "sender": (ALICE,),
        "reply_to": (ALICE,),
        "to": (BOB,),
        "cc": (),
        "bcc": (),
        "message_id": f"<{name}@example.org>",
    }


def crlf(b: bytes) -> bytes:
    return b.replace(b"\n", b"\r\n")


ORIGINAL = crlf(
    b"From: Carol <carol@example.com>\n"
    b"To: Alice Example <alice@example.org>\n"
    b"Subject: The original\n"
    b"Date: Mon, 01 Jan 2024 09:00:00 +0000\n"
    b"Message-ID: <original@example.com>\n\n"
    b"Original text."
)

# fixture -> expectations; "parts" maps a section path to BodyPart fields,
# "body" there is the exact slice raw[body_start:end].
EXPECT: dict[str, dict[str, Any]] = {
    "simple_crlf.eml": {
        "tree": "text/plain",
        "env": std_env("simple_crlf", "Plain CRLF"),
        "parts": {
            "": {
                "params": US_ASCII,
                "encoding": "7BIT",
                "lines": 5,
                "body": b"Hello Bob,\r\n\r\nthis is a plain message.\r\n-- \r\nAlice\r\n",
            }
        },
        "text": "Hello Bob,\n\nthis is a plain message.\n-- \nAlice\n",
    },
    "simple_lf.eml": {
        "tree": "text/plain",
        "env": std_env("simple_lf", "Plain bare LF"),
        "parts": {
            "": {
                "params": US_ASCII,
                "lines": 5,
                "body": b"Hello Bob,\n\nthis is a plain message.\n-- \nAlice\n",
            }
        },
        "preview": "Hello Bob, this is a plain message. -- Alice",
    },
    "no_mime_headers.eml": {
        "tree": "text/plain",
        "env": std_env("no_mime_headers", "No MIME headers at all"),
        "parts": {
            "": {
                "params": US_ASCII,
                "encoding": "7BIT",
                "lines": 1,
                "md5": None,
                "disposition": None,
                "body": b"Defaults apply: text/plain; charset=us-ascii, 7bit.\r\n",
            }
        },
    },
    "alternative.eml": {
        "tree": "multipart/alternative(text/plain, text/html)",
        "env": std_env("alternative", "Alternative"),
        "parts": {
            "": {"params": (("boundary", "alt-1"),), "lines": None},
            "1": {
                "params": (("charset", "utf-8"),),
                "encoding": "QUOTED-PRINTABLE",
                "lines": 1,
                "body": b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln",
            },
            "2": {
                "encoding": "QUOTED-PRINTABLE",
                "body": b"<html><body><p>Gr=C3=BC=C3=9Fe aus <b>K=C3=B6ln</b></p></body></html>",
            },
        },
        "text": "Grüße aus Köln",
        "attachments": False,
    },
    "nested_mixed_alt_related.eml": {
        "tree": "multipart/mixed(multipart/alternative(text/plain, "
        "multipart/related(text/html, image/png)), application/pdf)",
        "env": std_env("nested", "Nested mixed > alternative > related"),
        "parts": {
            "1": {"params": (("boundary", "alt"),)},
            "1.1": {"body": b"See the picture.", "lines": 1},
            "1.2": {"params": (("boundary", "rel"), ("type", "text/html"))},
            "1.2.1": {"body": b'<p>See the <img src="cid:pic@example.org"> picture.</p>'},
            "1.2.2": {
                "encoding": "BASE64",
                "id": "<pic@example.org>",
                "disposition": ("inline", ()),
                "lines": None,
                "body": crlf(b64(PNG_1X1).encode()),
            },
            "2": {
                "params": (("name", "report.pdf"),),
                "encoding": "BASE64",
                "description": "Quarterly report",
                "disposition": ("attachment", (("filename", "report.pdf"),)),
                "body": crlf(b64(PDF_TINY).encode()),
                "header": b'Content-Type: application/pdf; name="report.pdf"\r\n'
                b"Content-Transfer-Encoding: base64\r\n"
                b'Content-Disposition: attachment; filename="report.pdf"\r\n'
                b"Content-Description: Quarterly report\r\n\r\n",
            },
        },
        "text": "See the picture.",
        "attachments": True,
    },
    "rfc822_attachment.eml": {
        "tree": "multipart/mixed(text/plain, message/rfc822[text/plain])",
        "env": std_env("rfc822_attachment", "Fwd: The original"),
        "parts": {
            "1": {"params": (), "body": b"Forwarding this."},
            "2": {
                "disposition": ("attachment", ()),
                "lines": 7,  # 5 header lines, the blank line, the text
                "body": ORIGINAL,
                "message_env": {
                    "subject": "The original",
                    "date": "Mon, 01 Jan 2024 09:00:00 +0000",
                    "from_": (Address("Carol", None, "carol", "example.com"),),
                    "sender": (Address("Carol", None, "carol", "example.com"),),
                    "to": (ALICE,),
                    "message_id": "<original@example.com>",
                },
            },
            "2.m": {"params": US_ASCII, "body": b"Original text.", "lines": 1},
        },
        "text": "Forwarding this.\nOriginal text.",
        "attachments": True,
    },
    "rfc822_nested.eml": {
        "tree": "message/rfc822[multipart/mixed(text/plain, message/rfc822[text/plain])]",
        "env": std_env("rfc822_nested", "Fwd: Fwd: nested"),
        "parts": {
            "": {
                "message_env": {
                    "subject": "Middle",
                    "from_": (Address("Carol", None, "carol", "example.com"),),
                    "to": (ALICE,),
                }
            },
            "m": {"params": (("boundary", "mid"),)},
            "m.1": {"body": b"Middle text."},
            "m.2": {"message_env": {"subject": "Deepest", "date": None}},
            "m.2.m": {"body": b"Deepest text.", "lines": 1},
        },
        "text": "Middle text.\nDeepest text.",
    },
    "headers_8bit.eml": {
        "tree": "text/plain",
        "env": {
            "subject": "Grüße, 8-bit UTF-8 header",
            "from_": (Address("Jörg Müller", None, "joerg", "example.de"),),
            "to": (Address("Zoë", None, "zoe", "example.org"),),
        },
        "parts": {"": {"encoding": "8BIT", "body": "Schöne Grüße aus Köln.\r\n".encode()}},
        "subject": "Grüße, 8-bit UTF-8 header",
        "text": "Schöne Grüße aus Köln.\n",
    },
    "headers_latin1_raw.eml": {
        "tree": "text/plain",
        "env": {
            "subject": "Raw latin-1 bytes: café",
            "from_": (Address("Jörg Müller", None, "joerg", "example.de"),),
            "to": (Address(None, None, "bob", "example.net"),),
        },
        "parts": {"": {"params": (("charset", "iso-8859-1"),), "body": b"D\xe9j\xe0 vu.\r\n"}},
        "text": "Déjà vu.\n",
    },
    "encoded_words.eml": {
        "tree": "text/plain",
        "env": {
            "date": "Thu, 04 Jan 2024 08:30:00 -0500",
            # As sent, unfolded (RFC 3501: encoded-words are not decoded).
            "subject": "=?UTF-8?B?8J+YgA==?= =?UTF-8?Q?_smile_and_?= "
            "=?utf-8?b?5pel5pys?= =?utf-8?b?6Kqe?= plain",
            "from_": (Address("=?ISO-8859-1?Q?Andr=E9?= Pirard", None, "PIRARD", "vm1.ulg.ac.be"),),
            "to": (
                Address("=?KOI8-R?B?8NLJ18XU?=", None, "privet", "example.ru"),
                Address("=?windows-1252?Q?=93Quoted=94?=", None, "q", "example.com"),
            ),
            "cc": (Address("=?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?=", None, "nihongo", "example.jp"),),
            "in_reply_to": "<parent@example.com>",
            "message_id": "<encoded_words@example.com>",
        },
        "parts": {},
        "subject": "😀 smile and 日本語 plain",
        "from_text": "André Pirard <PIRARD@vm1.ulg.ac.be>",
        "to_text": "Привет <privet@example.ru>, “Quoted” <q@example.com>",
        "cc_text": "日本語 <nihongo@example.jp>",
        "in_reply_to": "<parent@example.com>",
        "references": ("<root@example.com>", "<parent@example.com>"),
        "sent_date": dt.datetime(2024, 1, 4, 13, 30, tzinfo=dt.UTC),
    },
    "charset_iso8859_1.eml": {
        "tree": "text/plain",
        "parts": {"": {"params": (("charset", "iso-8859-1"),), "encoding": "QUOTED-PRINTABLE"}},
        "text": "Café crème à Noël.\n",
    },
    "charset_koi8r.eml": {
        "tree": "text/plain",
        "parts": {"": {"params": (("charset", "koi8-r"),), "encoding": "8BIT"}},
        "text": "Привет, мир!\n",
    },
    "charset_windows1252.eml": {
        "tree": "text/plain",
        "parts": {"": {"body": b"\x93Smart quotes\x94 \x96 and \x80 signs.\r\n"}},
        "text": "“Smart quotes” – and € signs.\n",
    },
    "charset_iso2022jp.eml": {
        "tree": "text/plain",
        "parts": {"": {"encoding": "7BIT", "params": (("charset", "iso-2022-jp"),)}},
        "text": "こんにちは世界\n",
    },
    "charset_gb2312.eml": {
        "tree": "text/plain",
        "parts": {"": {"encoding": "BASE64", "lines": 1}},
        "text": "你好，世界\n",
    },
    "charset_unknown.eml": {
        "tree": "text/plain",
        "parts": {"": {"params": (("charset", "x-no-such-charset"),)}},
        "text": "Fallback works: naïve.\n",
    },
    "missing_close_boundary.eml": {
        "tree": "multipart/mixed(text/plain, text/plain)",
        "parts": {
            "1": {"body": b"First part."},
            # No close-delimiter: the last part runs to the end of the message.
            "2": {"body": b"Second part, never closed.\r\n", "lines": 1},
        },
        "text": "First part.\nSecond part, never closed.\n",
    },
    "boundary_never_appears.eml": {
        "tree": "multipart/mixed(text/plain)",
        "parts": {
            "1": {
                "params": US_ASCII,
                "body": b"The sender forgot the parts.\r\n--elsewhere\r\nStill text.\r\n",
                "header": b"",
            }
        },
        "text": "The sender forgot the parts.\n--elsewhere\nStill text.\n",
    },
    "bad_base64.eml": {
        "tree": "text/plain",
        "parts": {"": {"encoding": "BASE64", "lines": 2}},
        "text": "Hello world",
    },
    "duplicated_headers.eml": {
        "tree": "text/plain",
        "env": {
            "subject": "First subject",
            "from_": (Address("First", None, "first", "example.com"),),
            "date": None,
            "message_id": None,
        },
        "parts": {"": {"params": US_ASCII}},
        "sent_date": None,
    },
    "header_without_colon.eml": {
        "tree": "text/plain",
        "env": {
            "subject": "After the garbage line",
            "from_": (ALICE_PLAIN,),
            "to": (Address(None, None, "bob", "example.net"),),
        },
        "parts": {"": {"body": b"Body after a broken header.\r\n"}},
    },
    "nul_byte.eml": {
        "tree": "text/plain",
        "env": {"subject": "NUL\ufffdinside"},
        "parts": {"": {"body": b"Body with a \x00 NUL byte.\r\n"}},
        "text": "Body with a  NUL byte.\n",
    },
    "no_body.eml": {
        "tree": "text/plain",
        "env": {"subject": "Headers only, no blank line", "from_": (ALICE_PLAIN,)},
        "parts": {"": {"body": b"", "lines": 0}},
        "text": "",
        "preview": "",
    },
    "no_headers.eml": {
        "tree": "text/plain",
        "env": {
            "date": None,
            "subject": None,
            "from_": (),
            "sender": (),
            "reply_to": (),
            "to": (),
            "in_reply_to": None,
            "message_id": None,
        },
        "parts": {
            "": {
                "header": b"",
                "body": b"This message has no header at all.\r\nSecond line.\r\n",
                "lines": 2,
            }
        },
        "subject": "",
        "from_text": "",
        "text": "This message has no header at all.\nSecond line.\n",
    },
    "long_header_folded.eml": {
        "tree": "text/plain",
        "parts": {"": {"body": b"Forty recipients.\r\n"}},
    },
    "long_header_unfolded.eml": {
        "tree": "text/plain",
        "env": {"subject": "Long " + "x" * 1200 + " end"},
        "parts": {"": {"body": b"A single header line over 998 octets.\r\n"}},
    },
    "groups.eml": {
        "tree": "text/plain",
        "env": {
            "to": (
                group("Team"),
                Address("Bob B.", None, "bob", "example.net"),
                Address(None, None, "carol", "example.com"),
                GROUP_END,
                Address(None, None, "dave", "example.com"),
            ),
            "cc": (group("undisclosed-recipients"), GROUP_END),
            "bcc": (group("Empty Group"), GROUP_END),
        },
        "parts": {},
        "to_text": "Team: Bob B. <bob@example.net>, carol@example.com;, dave@example.com",
    },
    "route_and_comments.eml": {
        "tree": "text/plain",
        "env": {
            "from_": (Address("Alice in a comment", None, "alice", "example.org"),),
            "sender": (
                Address(None, "@relay1.example,@relay2.example", "secretary", "example.org"),
            ),
            "reply_to": (Address("Smith, John", None, '"john smith"', "example.com"),),
            # A missing domain is "" (NIL would read as group syntax).
            "to": (Address(None, None, "bob", "[192.0.2.1]"), Address(None, None, "nodomain", "")),
        },
        "parts": {},
    },
    "digest.eml": {
        "tree": "multipart/digest(message/rfc822[text/plain], message/rfc822[text/plain], "
        "text/plain)",
        "parts": {
            # RFC 2046 section 5.1.5: digest parts default to message/rfc822.
            "1": {"params": (), "header": b"\r\n", "lines": 4},
            "1.m": {"body": b"Item 1 text."},
            "2": {"message_env": {"subject": "Digest item 2", "to": ()}},
            "3": {"params": (), "body": b"Not a message."},
        },
    },
    "signed.eml": {
        "tree": "multipart/signed(text/plain, application/pgp-signature)",
        "parts": {
            "": {
                "params": (
                    ("micalg", "pgp-sha256"),
                    ("protocol", "application/pgp-signature"),
                    ("boundary", "sig"),
                )
            },
            # RFC 3156 section 5: the signed entity must be byte-exact.
            "1": {
                "entity": b"Content-Type: text/plain; charset=us-ascii\r\n"
                b"Content-Transfer-Encoding: 7bit\r\n\r\nSigned text.",
                "encoding": "7BIT",
            },
            "2": {
                "params": (("name", "signature.asc"),),
                "description": "OpenPGP digital signature",
                "disposition": ("attachment", (("filename", "signature.asc"),)),
                "body": b"-----BEGIN PGP SIGNATURE-----\r\n\r\niQEzBAEBCAAdFiEE\r\n"
                b"=abcd\r\n-----END PGP SIGNATURE-----",
            },
        },
        "text": "Signed text.",
    },
    "rfc2231_params.eml": {
        "tree": "multipart/mixed(text/plain, application/octet-stream)",
        "parts": {
            "2": {
                "params": (("name", "€ rates (2024).bin"),),
                "disposition_dict": ("attachment", {"filename": "résumé.bin", "size": "6"}),
                "language": ("fr", "en"),
                "location": "http://example.org/r.bin",
                "md5": "Q2hlY2sgSW50ZWdyaXR5IQ==",
                "encoding": "BASE64",
                "body": b"AAECAwQF",
            }
        },
        "attachments": True,
    },
    "calendar.eml": {
        "tree": "multipart/alternative(text/plain, text/calendar)",
        "parts": {
            "2": {
                "params": (("charset", "utf-8"), ("method", "REQUEST")),
                "encoding": "7BIT",
                "lines": 9,
            }
        },
        "text": "Standup at 10:00.",
    },
    "empty_parts.eml": {
        "tree": "multipart/mixed(text/plain, text/plain, text/plain, text/plain)",
        "parts": {
            "1": {"params": (), "body": b"", "lines": 0},
            "2": {"params": US_ASCII, "body": b"", "header": b"\r\n"},
            "3": {"params": US_ASCII, "body": b"", "header": b""},
            "4": {"body": b"last"},
        },
        "text": "\n\n\nlast",
    },
    "no_final_newline.eml": {
        "tree": "text/plain",
        "parts": {"": {"body": b"first line\r\nlast line without newline", "lines": 2}},
    },
    "html_only.eml": {
        "tree": "text/html",
        "parts": {"": {"params": (("charset", "utf-8"),)}},
        "text": "Only HTML & entities\nSecond paragraph",  # white space collapsed
        "preview": "Only HTML & entities Second paragraph",
    },
    "invalid_content_type.eml": {
        "tree": "text/plain",
        "parts": {"": {"params": US_ASCII, "encoding": "BASE64"}},
        "text": "Hello",
    },
    "mixed_line_endings.eml": {
        "tree": "multipart/mixed(text/plain, text/plain)",
        "parts": {
            "1": {"header": b"Content-Type: text/plain\n\n", "body": b"one"},
            "2": {"header": b"Content-Type: text/plain\r\n\r\n", "body": b"two"},
        },
    },
    "boundary_prefix.eml": {
        "tree": "multipart/mixed(multipart/alternative(text/plain, text/plain), text/plain)",
        "parts": {
            "1.1": {"body": b"inner one"},
            "1.2": {"body": b"inner two"},
            "2": {"body": b"outer two"},
        },
    },
}


def tree(b: BodyPart) -> str:
    s = f"{b.type}/{b.subtype}"
    if b.children:
        s += "(" + ", ".join(tree(c) for c in b.children) + ")"
    if b.message_body is not None:
        s += "[" + tree(b.message_body) + "]"
    return s


def part_at(root: BodyPart, path: str) -> BodyPart:
    p = root
    for step in filter(None, path.split(".")):
        if step == "m":
            assert p.message_body is not None
            p = p.message_body
        else:
            p = p.children[int(step) - 1]
    return p


def walk(b: BodyPart):
    yield b
    for c in b.children:
        yield from walk(c)
    if b.message_body is not None:
        yield from walk(b.message_body)


def load(name: str) -> tuple[bytes, ParsedMessage]:
    raw = (FIXTURES / name).read_bytes()
    return raw, parse_message(raw)


def test_corpus_is_large_enough_and_committed_as_generated():
    committed = {p.name: p.read_bytes() for p in FIXTURES.glob("*.eml")}
    assert len(committed) >= 30
    # The committed files are exactly what the generator writes (no line-ending
    # conversion by git, no hand edits drifting from the documented source).
    assert committed == corpus()
    assert set(EXPECT) == set(committed)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_fixture_expectations(name: str):
    raw, p = load(name)
    exp = EXPECT[name]
    assert tree(p.body) == exp["tree"]
    for field, value in exp.get("env", {}).items():
        assert getattr(p.envelope, field) == value, field
    for path, fields in exp["parts"].items():
        part = part_at(p.body, path)
        for field, value in fields.items():
            if field == "body":
                assert raw[part.body_start : part.end] == value
                assert part.size == len(value)
            elif field == "header":
                assert raw[part.header_start : part.body_start] == value
            elif field == "entity":
                assert raw[part.header_start : part.end] == value
            elif field == "message_env":
                assert part.message_envelope is not None
                for k, v in value.items():
                    assert getattr(part.message_envelope, k) == v, (path, k)
            elif field == "disposition_dict":
                assert part.disposition is not None
                assert (part.disposition[0], dict(part.disposition[1])) == value
            else:
                assert getattr(part, field) == value, (path, field)
    for key, field in (
        ("text", "body_text"),
        ("preview", "preview"),
        ("subject", "subject"),
        ("from_text", "from_text"),
        ("to_text", "to_text"),
        ("cc_text", "cc_text"),
        ("in_reply_to", "in_reply_to"),
        ("references", "references"),
        ("sent_date", "sent_date"),
        ("attachments", "has_attachments"),
    ):
        if key in exp:
            assert getattr(p, field) == exp[key], key


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_offsets_are_consistent(name: str):
    raw, p = load(name)
    assert p.size == len(raw)
    assert (p.body.header_start, p.body.end) == (0, len(raw))
    for part in walk(p.body):
        assert 0 <= part.header_start <= part.body_start <= part.end <= len(raw)
        assert part.size == part.end - part.body_start
        assert part.type == part.type.lower() and part.subtype == part.subtype.lower()
        assert part.encoding == part.encoding.upper()
        assert all(k == k.lower() for k, _ in part.params)
        header = raw[part.header_start : part.body_start]
        # A header block is empty, ends with its blank line, or runs to the end.
        assert not header or re.search(rb"(^|\n)\r?\n$", header) or part.body_start == part.end
        if part.type == "text" or (part.type, part.subtype) == ("message", "rfc822"):
            assert part.lines is not None
        else:
            assert part.lines is None
        if part.type == "multipart":
            assert part.children
            prev = part.body_start
            for c in part.children:
                assert prev <= c.header_start and c.end <= part.end
                prev = c.end
        if part.message_body is not None:
            assert part.message_body.header_start == part.body_start
            assert part.message_body.end == part.end


# Fixtures the stdlib parses the same way: its leaf payloads must equal our
# slices (it also gives the CRLF before a delimiter to the delimiter).
WELL_FORMED = [
    "simple_crlf.eml",
    "simple_lf.eml",
    "alternative.eml",
    "nested_mixed_alt_related.eml",
    "rfc822_attachment.eml",
    "rfc822_nested.eml",
    "signed.eml",
    "calendar.eml",
    "digest.eml",
    "rfc2231_params.eml",
    "boundary_prefix.eml",
]


@pytest.mark.parametrize("name", WELL_FORMED)
def test_leaf_bodies_agree_with_stdlib(name: str):
    raw, p = load(name)
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)

    def std_leaves(m):
        if m.is_multipart():
            for sub in m.get_payload():
                yield from std_leaves(sub)
        else:
            yield m.get_payload(decode=False)

    def our_leaves(b: BodyPart):
        if b.children:
            for c in b.children:
                yield from our_leaves(c)
        elif b.message_body is not None:
            yield from our_leaves(b.message_body)
        else:
            yield raw[b.body_start : b.end].decode("ascii", "surrogateescape")

    assert list(our_leaves(p.body)) == list(std_leaves(msg))


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_json_round_trip_is_exact(name: str):
    _, p = load(name)
    s = parsed_to_json(p)
    assert parsed_from_json(s) == dataclasses.replace(p, body_text="")
    assert "\x00" not in s and "\\u0000" not in s
    s.encode("utf-8")  # no lone surrogates: storable in any text column


def test_json_round_trip_keeps_timezone_and_none_date():
    _, p = load("encoded_words.eml")
    back = parsed_from_json(parsed_to_json(p))
    assert back.sent_date is not None and back.sent_date.utcoffset() == dt.timedelta(hours=-5)
    _, q = load("groups.eml")
    assert parsed_from_json(parsed_to_json(q)).sent_date is None


def test_json_leaves_the_body_text_to_its_column():
    """The search text is stored once, in the row's body_text column; a
    document written before that (with "text") still loads it."""
    import json

    _, p = load("simple_crlf.eml")
    assert p.body_text
    doc = json.loads(parsed_to_json(p))
    assert "text" not in doc and p.body_text not in parsed_to_json(p)
    doc["text"] = p.body_text
    assert parsed_from_json(json.dumps(doc)) == p


def test_json_refuses_unknown_version():
    _, p = load("simple_crlf.eml")
    with pytest.raises(ValueError):
        parsed_from_json(parsed_to_json(p).replace('"v":1', '"v":99', 1))


def test_large_attachment_parses_fast_and_slices_exactly():
    raw = large_message()
    p = parse_message(raw)
    assert tree(p.body) == "multipart/mixed(text/plain, application/octet-stream)"
    att = p.body.children[1]
    assert att.encoding == "BASE64"
    assert att.disposition == ("attachment", (("filename", "blob.bin"),))
    body = raw[att.body_start : att.end]
    assert body.startswith(b"AAECAwQF") and body.endswith(b"==")
    import base64

    assert len(base64.b64decode(body)) == ATTACHMENT_SIZE
    assert p.body_text == "The archive is attached."
    assert p.has_attachments
    # The stored JSON stays small: the attachment is never inlined.
    assert len(parsed_to_json(p)) < 4096


@pytest.mark.parametrize(
    "value, expected",
    [
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # RFC 2047 section 8 examples
        ("=?ISO-8859-1?Q?a?= b", "a b"),
        ("=?ISO-8859-1?Q?a?=  \r\n  =?ISO-8859-1?Q?b?=", "ab"),
        ("=?ISO-8859-1?Q?a_b?=", "a b"),
        ("=?ISO-8859-1?Q?a?= =?ISO-8859-2?Q?_b?=", "a b"),
        ("=?utf-8?b?w6k?=", "é"),  # missing padding
        ("=?utf-8?q?=C3?= =?utf-8?q?=A9?=", "é"),  # a character split across words
        ("=?UTF-8*en?Q?hi?=", "hi"),  # RFC 2231 section 5 language
        ("=?x-nope?Q?caf=E9?=", "café"),  # unknown charset falls back
        ("=?zlib?B?eJwDAAAAAAE=?=", "xœ\x03\ufffd\ufffd\ufffd\ufffd\x01"),  # no bytes codec
        ("no words here", "no words here"),
        ("=?utf-8?q?unterminated", "=?utf-8?q?unterminated"),
    ],
)
def test_decode_words(value: str, expected: str):
    assert decode_words(value) == expected


@pytest.mark.parametrize(
    "data, charset, expected",
    [
        (b"caf\xe9", "iso-8859-1", "café"),
        (b"\x93q\x94", "iso-8859-1", "“q”"),  # mislabelled windows-1252
        ("你好".encode("gbk"), "gb2312", "你好"),
        (b"caf\xc3\xa9", None, "café"),  # undeclared: UTF-8 if it is
        (b"caf\xe9", "us-ascii", "café"),
        (b"\xff\xfe", "utf-8", "\ufffd\ufffd"),
        (b"abc", "base64", "abc"),
        (b"abc", '"UTF-8"', "abc"),
    ],
)
def test_decode_charset(data: bytes, charset: str | None, expected: str):
    assert decode_charset(data, charset) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("a@b.c", (Address(None, None, "a", "b.c"),)),
        ('"Doe, J." <j@d.e>', (Address("Doe, J.", None, "j", "d.e"),)),
        ("J. Doe <j@d.e>", (Address("J. Doe", None, "j", "d.e"),)),
        (
            "john.q.public@mail.example.com",
            (Address(None, None, "john.q.public", "mail.example.com"),),
        ),
        ('"a b"@c.d', (Address(None, None, '"a b"', "c.d"),)),
        ('"ab"@c.d', (Address(None, None, "ab", "c.d"),)),
        ("j@d.e (J Doe)", (Address("J Doe", None, "j", "d.e"),)),
        ("<>", (Address(None, None, "", ""),)),
        ("g:;", (group("g"), GROUP_END)),
        ("g: a@b;", (group("g"), Address(None, None, "a", "b"), GROUP_END)),
        ("g: a@b", (group("g"), Address(None, None, "a", "b"), GROUP_END)),  # unterminated
        ("a@b,,c@d", (Address(None, None, "a", "b"), Address(None, None, "c", "d"))),
        ("", ()),
        ("  ", ()),
    ],
)
def test_parse_addresses(value: str, expected: tuple[Address, ...]):
    assert parse_addresses(value) == expected


def test_sender_and_reply_to_default_to_from_when_empty():
    raw = b"From: a@b.c\r\nSender:\r\nReply-To: \r\n\r\nx"
    env = parse_message(raw).envelope
    assert env.sender == env.reply_to == env.from_ == (Address(None, None, "a", "b.c"),)


@pytest.mark.parametrize(
    "markup, text",
    [
        ("<p>a</p><p>b</p>", "a\nb"),
        ("x <!-- hidden > still --> y", "x y"),
        ("<style>p{}</style><script>if (a<b) {}</script>seen", "seen"),
        ("a < b &lt; c &amp;&nbsp;d", "a < b < c & d"),
        ("a <!-- never closed", "a"),
        ("<" * 50_000 + "x", "<" * 50_000 + "x"),  # no quadratic blow-up, nothing lost
    ],
    ids=["blocks", "comment", "script", "entities", "unclosed", "lt-run"],
)
def test_html_to_text(markup: str, text: str):
    assert html_to_text(markup) == text


@pytest.mark.parametrize("boundary", ["caf\xe9".encode("latin-1"), "caf\xe9".encode()])
def test_eight_bit_boundary_is_found(boundary: bytes):
    raw = (
        b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n"
        b"--" + boundary + b"\r\n\r\none\r\n--" + boundary + b"--\r\n"
    )
    p = parse_message(raw)
    (part,) = p.body.children
    assert raw[part.body_start : part.end] == b"one"


def test_deep_nesting_does_not_recurse_forever():
    depth = 300
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    raw = head + b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    p = parse_message(raw)
    assert p.size == len(raw)
    parsed_from_json(parsed_to_json(p))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n",
        b"\x00" * 10,
        b":\r\n\r\n",
        b"Content-Type: multipart/mixed\r\n\r\n--\r\n",
        b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n--\r\n',
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Content-Type: text/plain; charset=\xff\xfe\r\n\r\nx",
        b"Content-Type: text/plain; charset*=''\r\n\r\nx",
        b'Content-Type: ;;;=;="\r\nContent-Disposition: ;\r\n\r\n',
        b'From: <<<@@@>>>,,;;::"\r\nTo: (((\r\nDate: Mon, 99 Foo 99999 99:99:99\r\n\r\n',
        b"Subject: =?utf-8?b?====?= =?\xff?q?=ZZ?=\r\n\r\n",
        b"From: a) b] <c)@d]>\r\nTo: )\r\nCc: ]\r\n\r\n",  # stray closers once looped forever
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=",
    ],
)
def test_garbage_never_raises(raw: bytes):
    p = parse_message(raw)
    assert p.size == len(raw)
    assert parsed_from_json(parsed_to_json(p)) == dataclasses.replace(p, body_text="")
