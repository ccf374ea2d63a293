"""Property tests: parse_message never raises, whatever the bytes, and what it
returns is always sliceable and storable (the contract ingest relies on)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.mime import parse_message, parsed_from_json, parsed_to_json
from storage.model import BodyPart

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mime"
SEEDS = [p.read_bytes() for p in sorted(FIXTURES.glob("*.eml"))]

# Bytes that matter to a MIME parser, so random messages hit the edge cases.
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"--",
    b"--b",
    b"--b--",
    b": ",
    b" ",
    b"\t",
    b"\x00",
    b"\xff",
    b"=?utf-8?b?",
    b"?=",
    b"=?koi8-r?q?=F0",
    b"Content-Type: multipart/mixed; boundary=b",
    b"Content-Type: message/rfc822",
    b"Content-Type: multipart/digest; boundary=b",
    b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable",
    b"Content-Type: text/plain; charset=",
    b"iso-2022-jp",
    b"Content-Disposition: attachment; filename*0*=utf-8''%E2",
    b"From: ",
    b"To: g: a@b, <c@d>;",
    b'"',
    b"(",
    b")",
    b"]",
    b"<",
    b"@",
    b"Date: Mon, 1 Jan 2024 10:00:00 +0100",
    b"abc",
]

messages = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=8)), max_size=60).map(
    b"".join
)


def check(raw: bytes) -> None:
    p = parse_message(raw)
    assert p.size == len(raw)

    def walk(b: BodyPart) -> None:
        assert 0 <= b.header_start <= b.body_start <= b.end <= len(raw)
        assert b.size == b.end - b.body_start
        if b.type == "multipart":
            assert b.children
        for c in b.children:
            assert b.body_start <= c.header_start and c.end <= b.end
            walk(c)
        if b.message_body is not None:
            walk(b.message_body)

    walk(p.body)
    s = parsed_to_json(p)
    s.encode("utf-8")
    assert parsed_from_json(s) == dataclasses.replace(p, body_text="")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_random_messages(raw: bytes) -> None:
    check(raw)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=6)), max_size=5),
    st.integers(0, 10_000),
)
def test_mutated_fixtures(seed: bytes, edits: list[tuple[int, bytes]], cut: int) -> None:
    raw = bytearray(seed)
    for pos, data in edits:
        pos %= len(raw) + 1
        raw[pos : pos + len(data)] = data
    check(bytes(raw[: len(raw) - cut % (len(raw) + 1)]))
