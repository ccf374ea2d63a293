"""The DATA line consumer against a straightforward reference.

``DataReader.feed`` is the server's hottest loop, written to avoid copying
lines; this checks it decides exactly as the plain reading of RFC 5321
sections 2.3.8, 4.5.2 and 4.5.3.1.6 does, for any sequence of lines and
line fragments: same end of data, verdict, size and content.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mtad.data import DataReader, DataVerdict


class Reference:
    """The rules spelled out, one copy per line: RFC 5321 sections 2.3.8,
    4.1.1.4 (a lone "." line with a bare CR or LF beside it is smuggling),
    4.5.2 and 4.5.3.1.6 (line length counted from any line end); bare CR
    and LF refused, or each made CRLF when ``normalize``."""

    def __init__(self, max_size: int, max_line: int, normalize: bool = False) -> None:
        self.max_size, self.max_line, self.normalize = max_size, max_line, normalize
        self.size, self.verdict, self.chunks, self.at_start = 0, DataVerdict.OK, [], True
        self.sent = b""  # the current CRLF line as sent, after a line-end marker
        self.text = b""  # the current CRLF line's text, unstuffed

    def feed(self, line: bytes) -> bool:
        if self.at_start and line == b".\r\n":
            return True
        complete = line.endswith(b"\r\n")
        self.sent = (b"\n" if self.at_start else self.sent) + line
        if self.at_start:
            self.text = b""
            if line.startswith(b"."):
                line = line[1:]
        self.at_start = complete
        body = line[:-2] if complete else line
        self.text += body
        if self.verdict is DataVerdict.OK:
            longest = max(len(p) for p in re.split(rb"[\r\n]", self.text))
            if re.search(rb"[\r\n]\.[\r\n]", self.sent):
                self.verdict = DataVerdict.SMUGGLING
            elif re.search(rb"[\r\n]", body) and not self.normalize:
                self.verdict = DataVerdict.BARE_LINE_ENDING
            elif longest + 2 > self.max_line:
                self.verdict = DataVerdict.LINE_TOO_LONG
            else:
                line = re.sub(rb"[\r\n]", b"\r\n", body) + (b"\r\n" if complete else b"")
        self.size += len(line)
        if self.verdict is DataVerdict.OK and self.size > self.max_size:
            self.verdict = DataVerdict.TOO_BIG
        if self.verdict is DataVerdict.OK:
            self.chunks.append(line)
        else:
            self.chunks = []
        return False


_piece = st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"x" * 7, b" ", b"\xff"])
# A "line" as readuntil(b"\r\n") hands it over: text then CRLF, or a fragment.
_line = st.builds(
    lambda parts, crlf: b"".join(parts) + (b"\r\n" if crlf else b""),
    st.lists(_piece, max_size=6),
    st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(
    lines=st.lists(_line, max_size=12),
    max_size=st.integers(min_value=0, max_value=60),
    max_line=st.integers(min_value=2, max_value=20),
    normalize=st.booleans(),
)
def test_feed_decides_as_the_reference(
    lines: list[bytes], max_size: int, max_line: int, normalize: bool
) -> None:
    fast = DataReader(max_size, max_line, normalize_bare=normalize)
    ref = Reference(max_size, max_line, normalize)
    for line in lines:
        ended = fast.feed(line)
        assert ended == ref.feed(line)
        assert (fast.verdict, fast.size) == (ref.verdict, ref.size)
        if ended:
            break
    if fast.verdict is DataVerdict.OK:
        assert fast.content == b"".join(ref.chunks)


def test_typical_message_lines() -> None:
    reader = DataReader(10_000)
    lines = [b"Subject: x\r\n", b"\r\n", b"..leading dot\r\n", b"end.\r\n"]
    assert not any(reader.feed(line) for line in lines)
    assert reader.feed(b".\r\n")
    assert reader.verdict is DataVerdict.OK
    assert reader.content == b"Subject: x\r\n\r\n.leading dot\r\nend.\r\n"


# -- spooling (issue #17: DATA held whole in memory) ---------------------------


def _random_message(rng, size: int) -> bytes:
    """``size``-ish octets of CRLF lines of random printable text, some dotted."""
    lines, total = [], 0
    while total < size:
        line = bytes(rng.choice(b"abcdefghij .,;:!") for _ in range(rng.randrange(0, 200)))
        if rng.random() < 0.05:
            line = b"." + line
        lines.append(line + b"\r\n")
        total += len(lines[-1])
    return b"".join(lines)


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=300_000),
    spool_at=st.integers(min_value=4096, max_value=70_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_spooled_data_is_byte_exact_and_memory_bounded(
    tmp_path_factory, size: int, spool_at: int, seed: int
) -> None:
    import random
    from pathlib import Path

    rng = random.Random(seed)
    spool_dir = tmp_path_factory.mktemp("spool")
    text = _random_message(rng, size)
    stuffed = text.replace(b"\r\n.", b"\r\n..")
    stuffed = (b"." + stuffed if stuffed.startswith(b".") else stuffed) + b".\r\n"
    reader = DataReader(10_000_000, 1000, spool_at=spool_at, spool_dir=spool_dir)
    ended, pos, largest_feed = False, 0, 0
    while not ended:  # as the session: runs up to a ".CRLF", at most 64 KiB each
        end = stuffed.find(b".\r\n", pos)
        cut = min(end + 3, pos + rng.randrange(1, 65_536))
        block = stuffed[pos:cut]
        if not block.endswith(b"\r\n"):
            cut = stuffed.rfind(b"\r\n", pos, cut) + 2
            block = stuffed[pos:cut]
        if not block:
            cut = stuffed.find(b"\r\n", pos) + 2
            block = stuffed[pos:cut]
        ended = reader.feed_lines(block)
        largest_feed = max(largest_feed, len(block))
        assert reader.held <= spool_at + largest_feed
        pos = cut
    assert reader.verdict is DataVerdict.OK
    got = reader.message()
    if len(text) > spool_at:
        assert isinstance(got, Path) and got.parent == spool_dir
        assert got.read_bytes() == text
    else:
        assert got == text
    reader.discard()
    assert list(spool_dir.iterdir()) == []


def test_spool_removed_when_message_is_refused(tmp_path) -> None:
    reader = DataReader(100_000, 1000, spool_at=4096, spool_dir=tmp_path)
    reader.feed_lines(b"x" * 900 + b"\r\n" * 1 + (b"y" * 900 + b"\r\n") * 10)
    assert len(list(tmp_path.iterdir())) == 1  # past 4096 octets: spooled
    reader.feed(b"a\nb\r\n")  # a bare LF: refused, nothing more kept
    assert reader.verdict is DataVerdict.BARE_LINE_ENDING
    assert list(tmp_path.iterdir()) == []
    assert reader.feed(b".\r\n")
