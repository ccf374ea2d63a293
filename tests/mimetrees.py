"""Random MIME trees for the attachment-storage tests: nested multiparts and
message/rfc822, base64, quoted-printable, 8-bit and 7-bit leaves whose
encoded bodies are just under, at, or just over a threshold (or far from
it), and broken ones (no closing boundary, a boundary that never appears,
a child cut with the wrong boundary). Bodies are drawn from a small pool
so that the same attachment recurs across messages. Every line ends in
CRLF and is at most 998 octets (RFC 5322 section 2.1.1), so SMTP carries
the bytes unchanged."""

from __future__ import annotations

import base64
import random
import uuid


def _b64(rng: random.Random, size: int) -> bytes:
    """About ``size`` bytes of base64 text in lines of random length."""
    text = base64.b64encode(rng.randbytes(max(1, size * 3 // 4)))
    lines, at = [], 0
    while at < len(text):
        step = rng.randint(1, 76)
        lines.append(text[at : at + step])
        at += step
    return b"\r\n".join(lines)


def _qp(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        line = bytearray()
        for _ in range(rng.randint(0, 72)):
            c = rng.randrange(256)
            if 33 <= c <= 126 and c != ord("="):
                line.append(c)
            else:
                line += b"=%02X" % c
        out += line + (b"=\r\n" if rng.random() < 0.5 else b"\r\n")
    return bytes(out).rstrip(b"\r\n=") or b"x"


def _8bit(rng: random.Random, size: int) -> bytes:
    alphabet = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
    lines, total = [], 0
    while total < size:
        n = rng.randint(0, 200)
        line = bytes(rng.choice(alphabet) for _ in range(n))
        lines.append(line)
        total += n + 2
    return b"\r\n".join(lines) or b"x"


class MimeTrees:
    """A generator of random messages around ``threshold`` bytes per part."""

    def __init__(self, rng: random.Random, threshold: int) -> None:
        self.rng = rng
        self.threshold = threshold
        self.pool: list[tuple[str, bytes]] = []  # (encoding, body) seen before

    def _size(self) -> int:
        rng, t = self.rng, self.threshold
        return rng.choice([
            t + rng.randint(-3, 3),  # at the edge, either side
            t + rng.randint(1, 300),
            t - rng.randint(1, 300),
            rng.randint(1, t // 3),
            t * rng.randint(2, 5) + rng.randint(1, 997),
        ])  # fmt: skip

    def leaf(self) -> bytes:
        rng = self.rng
        if self.pool and rng.random() < 0.35:
            encoding, body = rng.choice(self.pool)  # the same attachment again
        else:
            encoding = rng.choice(["base64", "quoted-printable", "8bit", "7bit"])
            size = max(1, self._size())
            body = {
                "base64": _b64,
                "quoted-printable": _qp,
                "8bit": _8bit,
                "7bit": lambda r, n: _b64(r, n).replace(b"+", b"-"),
            }[encoding](rng, size)
            self.pool.append((encoding, body))
        kind = rng.choice(["application/octet-stream", "image/png", "text/plain; charset=utf-8",
                           "application/pdf; name=\"r.pdf\""])  # fmt: skip
        disposition = rng.choice(["", "Content-Disposition: attachment; filename=\"a.bin\"\r\n"])
        return (
            f"Content-Type: {kind}\r\nContent-Transfer-Encoding: {encoding}\r\n{disposition}\r\n"
        ).encode() + body

    def part(self, depth: int) -> bytes:
        rng = self.rng
        roll = rng.random()
        if depth >= 3 or roll < 0.45:
            return self.leaf()
        if roll < 0.55:
            return b"Content-Type: message/rfc822\r\n\r\n" + self.message(depth + 1, top=False)
        boundary = f"=_b{uuid.UUID(int=rng.getrandbits(128)).hex}"
        children = [self.part(depth + 1) for _ in range(rng.randint(1, 4))]
        head = (
            f"Content-Type: multipart/{rng.choice(['mixed', 'related', 'alternative'])};"
            f'\r\n boundary="{boundary}"\r\n\r\n'
        ).encode()
        fault = rng.random()
        wrong = boundary + "x"
        body = b"preamble\r\n" if rng.random() < 0.3 else b""
        for n, child in enumerate(children):
            delimiter = wrong if fault < 0.08 and n == len(children) - 1 else boundary
            if fault < 0.04:
                delimiter = "never-" + boundary  # the declared boundary never appears
            body += f"--{delimiter}\r\n".encode() + child + b"\r\n"
        if fault > 0.12:  # else: no closing boundary
            body += f"--{boundary}--\r\n".encode()
            if rng.random() < 0.3:
                body += b"epilogue\r\n"
        return head + body

    def message(self, depth: int = 0, *, top: bool = True) -> bytes:
        rng = self.rng
        headers = (
            f"From: sender{rng.randint(1, 9999)}@example.net\r\n"
            f"To: someone@example.org\r\nSubject: tree {rng.getrandbits(40):x}\r\n"
            f"Message-ID: <{uuid.UUID(int=rng.getrandbits(128)).hex}@example.net>\r\n"
            "MIME-Version: 1.0\r\n"
        ).encode()
        raw = headers + self.part(depth)
        if top and not raw.endswith(b"\r\n"):
            raw += b"\r\n"
        return raw
