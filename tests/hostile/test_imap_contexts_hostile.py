"""RFC 5267 contexts under abuse (issue #24): huge and malformed PARTIAL
ranges, floods of UPDATE contexts, malformed RETURN options and
CANCELUPDATE arguments get BAD, NO or a bounded answer, each quickly, and
no other client waits (the probe of tests/hostile/conftest.py)."""

from __future__ import annotations

import random
import re
import socket
import time
from typing import BinaryIO

from tests.hostile.conftest import ALICE, ALICE_PW, Site, probing

# Seconds one hostile command may take to be answered (issue #18's bound
# for other clients is one second; the attacker gets no more).
MAX_ANSWER = 1.0


def _until(reader: BinaryIO, tag: bytes) -> list[bytes]:
    lines = []
    while True:
        line = reader.readline()
        assert line, "connection closed"
        lines.append(line.rstrip(b"\r\n"))
        if line.startswith(tag + b" "):
            return lines


def _timed(
    sock: socket.socket, reader: BinaryIO, tag: bytes, text: bytes
) -> tuple[list[bytes], float]:
    start = time.monotonic()
    sock.sendall(tag + b" " + text + b"\r\n")
    lines = _until(reader, tag)
    return lines, time.monotonic() - start


# (command, status of its answer, pattern an untagged line must match or None).
MALFORMED: list[tuple[bytes, bytes, bytes | None]] = [
    (b"SEARCH RETURN (PARTIAL 1:99999999999) ALL", b"BAD", None),
    (b"SEARCH RETURN (PARTIAL 1:" + b"9" * 30_000 + b") ALL", b"BAD", None),
    (b"SEARCH RETURN (PARTIAL " + b"-1:" * 10_000 + b"-1) ALL", b"BAD", None),
    (b"SEARCH RETURN (PARTIAL 1:2", b"BAD", None),
    (b"SEARCH RETURN (" + b"PARTIAL 1:2 " * 4000 + b") ALL", b"BAD", None),
    (b"SEARCH RETURN PARTIAL 1:2 ALL", b"BAD", None),
    (b"SEARCH RETURN (PARTIAL 1:2:3) ALL", b"BAD", None),
    (b"SEARCH RETURN (PARTIAL -0:-1) ALL", b"BAD", None),
    (b"SORT RETURN (UPDATE) (SIZE) UTF-8", b"BAD", None),
    (b"SORT RETURN (UPDATE SAVE) (SIZE) UTF-8 ALL", b"BAD", None),
    (b"CANCELUPDATE " + b'"x" ' * 2000, b"BAD", None),
    (b'CANCELUPDATE "', b"BAD", None),
    (b"CANCELUPDATE (x)", b"BAD", None),
    # The largest ranges there are: answered from the results, not the range.
    (b"SEARCH RETURN (PARTIAL 1:4294967295) ALL", b"OK", rb"PARTIAL \(1:4294967295 1:\d+\)"),
    (b"UID SEARCH RETURN (PARTIAL -1:-4294967295) ALL", b"OK", rb"PARTIAL \(-1:-4294967295 "),
    (b"SORT RETURN (PARTIAL 4294967295:4294967294) (SIZE) UTF-8 ALL", b"OK", rb" NIL\)"),
    (
        b"UID SORT RETURN (PARTIAL -4294967295:-1 COUNT) (REVERSE SIZE) UTF-8 ALL",
        b"OK",
        rb"COUNT \d+",
    ),
    # Thousands of UPDATE and CONTEXT words: one context at most.
    (b"SEARCH RETURN (" + b"UPDATE CONTEXT " * 3000 + b"COUNT) ALL", b"OK", rb"COUNT \d+"),
]


def test_context_abuse_is_answered_quickly_and_delays_no_one(site: Site) -> None:
    rng = random.Random()
    with probing(site):
        sock = socket.create_connection(("127.0.0.1", site.ports["imap"]), timeout=30)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(f'a LOGIN "{ALICE}" "{ALICE_PW}"\r\n'.encode())
        assert reader.readline().startswith(b"a OK")
        count = rng.randint(150, 250)
        for n in range(count):
            body = bytes(rng.choice(b"abcdefgh \r\n") for _ in range(rng.randint(10, 3000)))
            raw = b"Subject: s%d\r\nFrom: x@example.net\r\n\r\n%s\r\n" % (n, body)
            sock.sendall(b"p%d APPEND INBOX {%d+}\r\n%s\r\n" % (n, len(raw), raw))
        for n in range(count):
            assert _until(reader, b"p%d" % n)[-1].startswith(b"p%d OK" % n)
        sock.sendall(b"s SELECT INBOX\r\n")
        _until(reader, b"s")

        timings: dict[str, float] = {}
        for n, (text, status, pattern) in enumerate(MALFORMED):
            tag = b"m%d" % n
            lines, took = _timed(sock, reader, tag, text)
            assert lines[-1].split(b" ")[1] == status, (text[:80], lines[-1])
            if pattern is not None:
                assert any(re.search(pattern, ln) for ln in lines[:-1]), (text[:80], lines)
            assert took < MAX_ANSWER, (text[:80], took)
            timings[text[:40].decode(errors="replace")] = took

        # A flood of UPDATE contexts, pipelined: a few are kept (one made
        # above), every other one answered NOUPDATE with its result.
        flood = 500
        start = time.monotonic()
        sock.sendall(
            b"".join(b"u%d UID SEARCH RETURN (UPDATE COUNT) UNSEEN\r\n" % n for n in range(flood))
        )
        kept: list[bytes] = []
        for n in range(flood):
            lines = _until(reader, b"u%d" % n)
            assert lines[-1].startswith(b"u%d OK" % n), lines
            if not any(b'[NOUPDATE "u%d"]' % n in ln for ln in lines):
                kept.append(b"u%d" % n)
        took_search = time.monotonic() - start
        assert 1 <= len(kept) <= 4, kept  # 5 a session, one made by the last MALFORMED
        start = time.monotonic()
        sock.sendall(
            b"".join(
                b"v%d SORT RETURN (UPDATE COUNT) (REVERSE SIZE) UTF-8 ALL\r\n" % n
                for n in range(200)
            )
        )
        for n in range(200):
            lines = _until(reader, b"v%d" % n)
            assert lines[-1].startswith(b"v%d OK" % n) and b"NOUPDATE" in lines[0], lines
        took_sort = time.monotonic() - start
        # Tag reuse (RFC 5267 section 4.3): BAD, however often.
        for _ in range(50):
            lines, took = _timed(sock, reader, kept[0], b"SEARCH RETURN (UPDATE) ALL")
            assert lines == [kept[0] + b" BAD Tag reuse"] and took < MAX_ANSWER, lines

        # New mail: only the contexts kept hear of it.
        raw = b"Subject: late\r\n\r\nhello\r\n"
        lines, took_append = _timed(
            sock, reader, b"z", b"APPEND INBOX {%d+}\r\n%s" % (len(raw), raw)
        )
        heard = [ln for ln in lines if b"ADDTO" in ln]
        assert len(heard) == len(kept) + 1, heard
        sock.close()
    print(
        f"\ncontexts hostile: {count} messages; slowest malformed {max(timings.values()):.3f} s;"
        f" {flood} UPDATE SEARCHes {took_search:.2f} s ({len(kept)} kept);"
        f" 200 UPDATE SORTs {took_sort:.2f} s; APPEND with contexts {took_append:.3f} s"
    )
    assert took_search < 10 and took_sort < 20, (took_search, took_sort)
