"""Modified UTF-7 mailbox names (RFC 3501 section 5.1.3).

Printable US-ASCII except "&" stands for itself; "&" is "&-"; any other run
of characters is UTF-16BE, base64 with "," for "/" and no padding, between
"&" and "-".
"""

from __future__ import annotations

import base64


class Utf7Error(ValueError):
    """A name that is not valid modified UTF-7."""


def _is_direct(ch: str) -> bool:
    return 0x20 <= ord(ch) <= 0x7E


def encode_mailbox(name: str) -> str:
    """UTF-8 (Python str) mailbox name -> modified UTF-7."""
    if all(_is_direct(c) and c != "&" for c in name):
        return name  # the common case: nothing to do
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            run.clear()

    for ch in name:
        if _is_direct(ch):
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def decode_mailbox(name: str) -> str:
    """Modified UTF-7 -> UTF-8 str. Raises :class:`Utf7Error` on malformed
    input and on any form but the canonical one, so that one mailbox has one
    name on the wire: ``encode_mailbox(decode_mailbox(w)) == w``."""
    if "&" not in name:
        for ch in name:
            if not _is_direct(ch):
                raise Utf7Error("8-bit or control character in mailbox name")
        return name
    out: list[str] = []
    i, n = 0, len(name)
    while i < n:
        ch = name[i]
        if ch != "&":
            if not _is_direct(ch):
                raise Utf7Error("8-bit or control character in mailbox name")
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise Utf7Error("unterminated &... in mailbox name")
        chunk = name[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            if any(c not in _B64 for c in b64) or len(b64) % 4 == 1:
                raise Utf7Error("bad base64 in mailbox name")
            _check_canonical_run(b64, name, end)
            try:
                raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
                text = raw.decode("utf-16-be")
            except (ValueError, UnicodeDecodeError) as exc:
                raise Utf7Error("bad modified UTF-7 in mailbox name") from exc
            # RFC 3501 5.1.3: printable ASCII must not be base64-encoded.
            if any(_is_direct(c) for c in text):
                raise Utf7Error("printable US-ASCII encoded in mailbox name")
            out.append(text)
        i = end + 1
    return "".join(out)


def _check_canonical_run(b64: str, name: str, end: int) -> None:
    """RFC 3501 section 5.1.3: a base64 run is the shortest form of whole
    UTF-16 units (so the bits past the last octet are zero) and two runs
    are never adjacent (they are written as one)."""
    spare_bits = len(b64) * 6 % 8  # 0, 2 or 4 bits beyond the last octet
    if _B64_VALUE[b64[-1]] & ((1 << spare_bits) - 1):
        raise Utf7Error("non-zero padding bits in mailbox name")
    if name.startswith("&", end + 1) and not name.startswith("&-", end + 1):
        raise Utf7Error("adjacent base64 runs in mailbox name")


_B64_VALUE = {
    c: i
    for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}
_B64 = frozenset(_B64_VALUE)
