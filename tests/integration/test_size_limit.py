"""One message size limit (``server.max_message_size``) on every way in, at
the limit and one octet past it, with random bytes and real clients: SMTP
(SIZE, RFC 1870 sections 4 and 6), IMAP APPEND (APPENDLIMIT, RFC 7889
sections 3 and 4) and the HTTP API's send."""

from __future__ import annotations

import base64
import imaplib
import json
import random
import smtplib
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.sitehelp import Site

USER, PASSWORD = "alice@example.org", "pw-size-1"


def _message(size: int, rng: random.Random) -> bytes:
    """Exactly ``size`` octets of CRLF-ended lines of random text."""
    out = bytearray(f"From: b@example.net\r\nSubject: {rng.random()}\r\n\r\n".encode())
    while size - len(out) > 80:
        out += rng.randbytes(rng.randint(1, 36)).hex().encode() + b"\r\n"
    rest = size - len(out) - 2  # the last line, then its CRLF
    out += bytes(rng.choice(b"abcdef0123456789") for _ in range(rest)) + b"\r\n"
    return bytes(out)


def test_one_limit_for_smtp_imap_append_and_the_api(tmp_path: Path) -> None:
    rng = random.Random()
    limit = rng.randint(40_000, 200_000)
    site = Site(tmp_path, "fs", f"server.max_message_size={limit}")
    site.add_accounts([USER], PASSWORD)
    at, over = _message(limit, rng), _message(limit + 1, rng)
    assert (len(at), len(over)) == (limit, limit + 1)
    site.start()
    try:
        with site.smtp() as smtp:
            smtp.ehlo("client.example")
            assert smtp.esmtp_features["size"] == str(limit)  # RFC 1870 section 4
            assert smtp.sendmail("b@example.net", [USER], at) == {}
            # Declared too big (smtplib sends SIZE=): refused at MAIL, RFC 1870 section 6.1.
            try:
                smtp.sendmail("b@example.net", [USER], over)
                raise AssertionError("a message past the limit was accepted over SMTP")
            except smtplib.SMTPSenderRefused as err:
                assert err.smtp_code == 552
        with site.smtp() as smtp:
            # Not declared, sent anyway: refused after DATA (RFC 1870 section 6.3).
            smtp.ehlo("client.example")
            assert smtp.mail("b@example.net")[0] == 250
            assert smtp.rcpt(USER)[0] == 250
            assert smtp.data(over)[0] == 552

        imap = site.imap(USER, PASSWORD)
        try:
            caps = imap.capability()[1][0].split()
            assert f"APPENDLIMIT={limit}".encode() in caps  # RFC 7889 section 3
            assert imap.append("INBOX", None, None, at)[0] == "OK"
            try:
                status, answer = imap.append("INBOX", None, None, over)
            except imaplib.IMAP4.error as err:  # a tagged NO or BAD
                status, answer = "NO", [str(err).encode()]
            assert status == "NO" and b"TOOBIG" in answer[0], answer  # RFC 7889 section 4
            imap.select("INBOX", readonly=True)
            status, found = imap.uid("SEARCH", "ALL")
            bodies = [imap.uid("FETCH", u, "(BODY.PEEK[])")[1][0][1] for u in found[0].split()]
        finally:
            imap.logout()
        # The SMTP one (below its trace fields) and the appended one, byte-exact.
        assert sum(b.endswith(at) for b in bodies) == 2 and len(bodies) == 2
        assert at in bodies

        def send(payload: bytes) -> int:
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            draft = {
                "to": ["bob@example.net"],
                "subject": "size",
                "attachments": [
                    {"filename": "a.bin", "content": base64.b64encode(payload).decode()}
                ],
            }
            request = urllib.request.Request(
                f"http://127.0.0.1:{site.ports['http.listen']}/v1/messages",
                data=json.dumps(draft).encode(),
                headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    return int(answer.status)
            except urllib.error.HTTPError as err:
                return int(err.code)

        # An attachment of limit + 1 octets cannot fit: 413; one well within fits.
        assert send(rng.randbytes(limit + 1)) == 413
        assert send(rng.randbytes(limit // 2)) == 202
    finally:
        site.stop()
