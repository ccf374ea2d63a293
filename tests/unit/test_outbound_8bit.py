"""What the relay asks of the next hop for a message's octets: 8BITMIME for
any octet above 127, SMTPUTF8 for one in the header section (RFC 6531
section 3.4, RFC 6532 section 3). Checked against a plain reference on
random bytes, and on a 25 MB message, where the old per-octet Python loop
held the event loop for seconds."""

from __future__ import annotations

import random
import time

from mtad.outbound.delivery import header_needs_smtputf8, needs_8bit


def _reference(message: bytes) -> tuple[bool, bool]:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    return any(b > 127 for b in message), any(b > 127 for b in head)


def test_matches_the_reference_on_random_messages() -> None:
    for _ in range(400):
        header = bytes(random.choice(b"abc: \r\n") for _ in range(random.randint(0, 200)))
        body = bytes(random.choice(b"xyz \r\n") for _ in range(random.randint(0, 500)))
        message = bytearray(header + random.choice([b"\r\n\r\n", b""]) + body)
        for _ in range(random.randint(0, 2)):
            if message:
                message[random.randrange(len(message))] = random.randint(128, 255)
        message = bytes(message)
        assert (needs_8bit(message), header_needs_smtputf8(message)) == _reference(message)


def test_a_25_mb_message_is_checked_in_c_not_per_octet() -> None:
    body = random.randbytes(1 << 16).translate(bytes(range(128)) * 2) * 400  # 26 MB of ASCII
    message = b"Subject: big\r\n\r\n" + body + "é".encode()
    started = time.process_time()
    assert needs_8bit(message) and not header_needs_smtputf8(message)
    assert time.process_time() - started < 0.1  # the per-octet loop took 0.7-2 s
