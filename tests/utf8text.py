"""Random UTF-8 text for tests of internationalized mail (RFC 6532)."""

from __future__ import annotations

import random

WORDS = ["Grüße", "naïve", "日本語", "Ελληνικά", "emoji😀", "plain", "façade", "Ærø"]


def utf8_subject() -> str:
    """A subject with UTF-8 words around a unique number."""
    return f"{random.choice(WORDS)} {random.randrange(10**9)} {random.choice(WORDS)}"


def utf8_message(from_field: str, to_field: str, subject: str, domain: str) -> bytes:
    """An 8-bit text/plain message of random UTF-8 lines, CRLF line ends."""
    body = "\r\n".join(
        " ".join(random.choices(WORDS, k=random.randint(1, 12)))
        for _ in range(random.randint(1, 80))
    )
    return (
        f"From: {from_field}\r\nTo: {to_field}\r\nSubject: {subject}\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <{random.randrange(10**12)}@{domain}>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        f"\r\n{body}\r\n"
    ).encode()
