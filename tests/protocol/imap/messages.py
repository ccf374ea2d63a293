"""Test messages for the IMAP protocol suite."""

from __future__ import annotations

PLAIN = (
    b"From: Carol <carol@example.net>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Cc: Dave <dave@example.com>\r\n"
    b"Subject: Lunch plans\r\n"
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
    b"Message-ID: <lunch@example.net>\r\n"
    b"X-Mood: hungry\r\n"
    b"\r\n"
    b"Shall we meet at noon?\r\n"
)

MULTIPART = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Bcc: Eve <eve@example.org>\r\n"
    b"Subject: Report attached\r\n"
    b"Date: Tue, 1 Mar 2022 10:00:00 +0000\r\n"
    b"Message-ID: <report@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"See the quarterly numbers.\r\n"
    b"--XX\r\n"
    b"Content-Type: application/octet-stream; name=data.bin\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=data.bin\r\n"
    b"\r\n"
    b"AAECAwQFBgcICQ==\r\n"
    b"--XX--\r\n"
)

FORWARD = (
    b"From: Frank <frank@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: Fwd: old news\r\n"
    b"Date: Wed, 2 Mar 2022 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="B1"\r\n'
    b"\r\n"
    b"--B1\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Forwarding this.\r\n"
    b"--B1\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: Grace <grace@example.org>\r\n"
    b"Subject: old news\r\n"
    b"\r\n"
    b"Inner body.\r\n"
    b"--B1--\r\n"
)
