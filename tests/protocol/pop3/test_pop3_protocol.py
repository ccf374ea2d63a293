"""POP3 conversations as tables: client lines -> expected replies (RFC 1939,
RFC 2449, RFC 2595, RFC 5034), over loopback sockets to a real server.

Each expected reply is a regular expression matched against the whole
reply: the status line, and for a positive multi-line reply its
un-stuffed lines joined by "\\n". ``%UV%``, ``%U1%``, ``%U2%`` stand for the
INBOX UIDVALIDITY and the two UIDs, ``%S1%``, ``%S2%``, ``%T%`` for the
message sizes and their sum.
"""

from __future__ import annotations

import base64
import re

import pytest

from tests.protocol.pop3.harness import MSG1, MSG2, PASSWORD, USER, Pop3Client, ports_of

OK = r"\+OK"
NOT_IN_STATE = r"-ERR command not valid in this state"
NO_SUCH = r"-ERR no such message"
PLAINTEXT = r"-ERR \[AUTH\] plaintext authentication disallowed without TLS, use STLS first"
AUTH_FAILED = r"-ERR \[AUTH\] authentication failed"
MAILDROP_FULL = r"\+OK maildrop has 2 messages \(%T% octets\)"
SIGNOFF = r"\+OK shardmail POP3 server signing off"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


LOGIN = [(f"USER {USER}", r"\+OK send PASS"), (f"PASS {PASSWORD}", MAILDROP_FULL)]
MSG1_LINES = (
    r"From: Carol <carol@example.net>\nTo: alice@example.org\nSubject: first\n"
    r"Message-ID: <one@example.net>\n"
)
MSG2_HEADER = r"From: Dave <dave@example.net>\nTo: alice@example.org\nSubject: second\n"

CASES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    # -- AUTHORIZATION before TLS, plaintext refused (RFC 2595 section 4) --
    "capa_before_tls": ("plain", [
        ("CAPA", r"\+OK Capability list follows\nTOP\nUIDL\nRESP-CODES\nAUTH-RESP-CODE\n"
                 r"PIPELINING\nSTLS\nEXPIRE NEVER\nIMPLEMENTATION shardmail"),
        ("QUIT", SIGNOFF),
    ]),
    "plaintext_refused_before_tls": ("plain", [
        (f"USER {USER}", PLAINTEXT),
        (f"PASS {PASSWORD}", PLAINTEXT),
        (f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + PASSWORD)}", PLAINTEXT),
        ("AUTH PLAIN", PLAINTEXT),
        ("AUTH", r"\+OK SASL mechanisms follow"),
        ("APOP alice 0123456789abcdef0123456789abcdef", r"-ERR APOP not supported"),
    ]),
    "transaction_commands_before_login": ("plain", [
        ("STAT", NOT_IN_STATE), ("LIST", NOT_IN_STATE), ("LIST 1", NOT_IN_STATE),
        ("RETR 1", NOT_IN_STATE), ("DELE 1", NOT_IN_STATE), ("NOOP", NOT_IN_STATE),
        ("RSET", NOT_IN_STATE), ("TOP 1 1", NOT_IN_STATE), ("UIDL", NOT_IN_STATE),
    ]),
    "malformed_and_unknown": ("plain", [
        ("", r"-ERR empty command line"),
        ("   ", r"-ERR empty command line"),
        ("FOO", r"-ERR unknown command"),
        ("FOOBAR", r"-ERR unknown command"),
        ("XY", r"-ERR unknown command"),
        ("12 34", r"-ERR unknown command"),
        ("capa", r"\+OK Capability list follows\n(.*\n)*IMPLEMENTATION shardmail"),
        ("USER " + "x" * 300, r"-ERR argument too long"),  # RFC 2449 section 4
    ]),
    # -- AUTHORIZATION over TLS (implicit, port 995) --
    "capa_after_tls": ("tls", [
        ("CAPA", r"\+OK Capability list follows\nTOP\nUIDL\nRESP-CODES\nAUTH-RESP-CODE\n"
                 r"PIPELINING\nUSER\nSASL PLAIN\nEXPIRE NEVER\nIMPLEMENTATION shardmail"),
        ("STLS", r"-ERR TLS already active"),
        ("AUTH", r"\+OK SASL mechanisms follow\nPLAIN"),
    ]),
    "user_pass": ("tls", [
        (f"PASS {PASSWORD}", r"-ERR USER first"),
        ("USER", r"-ERR syntax: USER name"),
        ("USER a b", r"-ERR syntax: USER name"),
        (f"USER {USER}", r"\+OK send PASS"),
        ("PASS wrong password", AUTH_FAILED),
        (f"PASS {PASSWORD}", r"-ERR USER first"),  # a failed PASS forgets USER
        ("USER nobody@example.org", r"\+OK send PASS"),  # no hint the name is unknown
        (f"PASS {PASSWORD}", AUTH_FAILED),
        *LOGIN,
        ("QUIT", SIGNOFF + r" \(0 deleted, 2 left\)"),
    ]),
    "auth_plain_initial_response": ("tls", [
        (f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + PASSWORD)}", MAILDROP_FULL),
        ("STAT", r"\+OK 2 %T%"),
    ]),
    "auth_plain_authzid_same_user": ("tls", [
        (f"AUTH PLAIN {b64(USER + chr(0) + USER + chr(0) + PASSWORD)}", MAILDROP_FULL),
    ]),
    "auth_plain_continuation": ("tls", [
        ("AUTH PLAIN", r"\+ "),
        (b64("\0" + USER + "\0" + PASSWORD), MAILDROP_FULL),
    ]),
    "auth_errors": ("tls", [
        ("AUTH PLAIN", r"\+ "),
        ("*", r"-ERR authentication cancelled"),
        ("AUTH LOGIN", r"-ERR unsupported authentication mechanism"),
        ("AUTH PLAIN !!!notbase64", r"-ERR invalid base64 in SASL response"),
        (f"AUTH PLAIN {b64('no-nuls-here')}", r"-ERR malformed PLAIN response"),
        (f"AUTH PLAIN {b64('bob@example.org' + chr(0) + USER + chr(0) + PASSWORD)}",
         AUTH_FAILED),
        (f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + 'wrong')}", AUTH_FAILED),
        ("AUTH PLAIN", r"\+ "),
        (b64("\0" + USER + "\0" + PASSWORD), MAILDROP_FULL),
    ]),
    # -- TRANSACTION (RFC 1939 section 5) --
    "listings": ("tls", [
        *LOGIN,
        ("STAT", r"\+OK 2 %T%"),
        ("STAT 1", r"-ERR syntax: STAT"),
        ("LIST", r"\+OK 2 messages \(%T% octets\)\n1 %S1%\n2 %S2%"),
        ("LIST 2", r"\+OK 2 %S2%"),
        ("LIST 3", NO_SUCH),
        ("LIST 0", r"-ERR invalid message number"),
        ("LIST -1", r"-ERR invalid message number"),
        ("LIST x", r"-ERR invalid message number"),
        ("LIST 99999999999999", r"-ERR invalid message number"),
        ("LIST 1 2", r"-ERR syntax: LIST \[msg\]"),
        ("UIDL", r"\+OK unique-id listing follows\n1 %UV%.%U1%\n2 %UV%.%U2%"),
        ("UIDL 1", r"\+OK 1 %UV%.%U1%"),
        ("UIDL 3", NO_SUCH),
        ("NOOP", r"\+OK"),
        ("CAPA", r"\+OK Capability list follows\nTOP\nUIDL\nRESP-CODES\nAUTH-RESP-CODE\n"
                 r"PIPELINING\nEXPIRE NEVER\nIMPLEMENTATION shardmail"),
        (f"USER {USER}", NOT_IN_STATE),
        (f"PASS {PASSWORD}", NOT_IN_STATE),
        ("AUTH PLAIN", NOT_IN_STATE),
        ("STLS", NOT_IN_STATE),
        ("APOP a b", NOT_IN_STATE),
        ("BOGUS", r"-ERR unknown command"),
    ]),
    "retr_and_top": ("tls", [
        *LOGIN,
        ("RETR 1", r"\+OK %S1% octets\n" + MSG1_LINES
         + r"\nline one\n\.starts with a dot\n\.\nlast line"),
        # Bare LF is sent as CRLF; the missing final line ending is added.
        ("RETR 2", r"\+OK %S2% octets\n" + MSG2_HEADER + r"\nbody 1\nbody 2\n\.\.two dots"),
        ("TOP 1 0", r"\+OK top of message follows\n" + MSG1_LINES + r""),
        ("TOP 1 2", r"\+OK top of message follows\n" + MSG1_LINES
         + r"\nline one\n\.starts with a dot"),
        ("TOP 2 1", r"\+OK top of message follows\n" + MSG2_HEADER + r"\nbody 1"),
        ("TOP 2 100", r"\+OK top of message follows\n" + MSG2_HEADER
         + r"\nbody 1\nbody 2\n\.\.two dots"),
        ("TOP 3 1", NO_SUCH),
        ("TOP 1 x", r"-ERR invalid line count"),
        ("TOP 1", r"-ERR syntax: TOP msg n"),
        ("RETR", r"-ERR syntax: RETR msg"),
        ("RETR 3", NO_SUCH),
        ("RETR 1 2", r"-ERR syntax: RETR msg"),
    ]),
    "dele_rset_quit": ("tls", [
        *LOGIN,
        ("DELE", r"-ERR syntax: DELE msg"),
        ("DELE 1", r"\+OK message 1 deleted"),
        ("DELE 1", NO_SUCH),
        ("RETR 1", NO_SUCH),
        ("TOP 1 0", NO_SUCH),
        ("LIST 1", NO_SUCH),
        ("UIDL 1", NO_SUCH),
        ("STAT", r"\+OK 1 %S2%"),
        ("LIST", r"\+OK 1 messages \(%S2% octets\)\n2 %S2%"),
        ("UIDL", r"\+OK unique-id listing follows\n2 %UV%.%U2%"),
        ("RSET", MAILDROP_FULL),
        ("STAT", r"\+OK 2 %T%"),
        ("DELE 2", r"\+OK message 2 deleted"),
        ("QUIT", SIGNOFF + r" \(1 deleted, 1 left\)"),
    ]),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_conversation(name, pop3, pop3_storage, account, filled, client_tls_context):
    listener, steps = CASES[name]
    inbox = await pop3_storage.mail(account).get_mailbox(account.id, "INBOX")
    values = {
        "%UV%": str(inbox.uidvalidity),
        "%U1%": str(filled[0]),
        "%U2%": str(filled[1]),
        "%S1%": str(len(MSG1)),
        "%S2%": str(len(MSG2)),
        "%T%": str(len(MSG1) + len(MSG2)),
    }
    ports = ports_of(pop3)
    if listener == "tls":
        client = await Pop3Client.connect(ports.tls, client_tls_context)
    else:
        client = await Pop3Client.connect(ports.plain)
    assert client.greeting == "+OK shardmail POP3 server ready"
    try:
        for line, expected in steps:
            for key, value in values.items():
                expected = expected.replace(key, value)
            reply = await client.command(line)
            assert re.fullmatch(expected, reply), f"{line!r}: {reply!r} !~ {expected!r}"
    finally:
        await client.close()
