"""Base-subject extraction and REFERENCES threading (RFC 5256 sections 2.1
and 4) on hostile input: the work, counted in steps, grows linearly (n vs 2n
within a generous ratio), and wall-clock growth over 8x the input is
checked with tests/linearity.py's loose bound. Plus hand-checked results."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from imapd.imap.sortkeys import SortFields, base_subject, casemap
from imapd.imap.threads import WALK_BUDGET_PER_MESSAGE, encode_threads, references
from tests.linearity import assert_linear

# Hand-checked against RFC 5256 section 2.1 steps (1)-(7).
BASE_SUBJECTS = [
    ("Re: hello", "hello", True),
    ("RE: [list] Re: hello (fwd)", "hello", True),
    ("[fwd: Re: hi]", "hi", True),
    ("[a][b] x", "x", False),
    ("[a][b]", "[b]", False),  # the last blob is the base when nothing follows
    ("  Fwd[3]:  x  ", "x", True),
    ("[fwd: [fwd: re: z]]", "z", True),
    ("Re Re", "Re Re", False),  # no colon: not a subj-refwd
    ("[list] Re: [other] Fw: t", "t", True),
    ("hello\t\r\n world", "hello world", False),
    ("", "", False),
    ("(fwd)", "", True),
    ("[unclosed re: x", "[unclosed re: x", False),
]


@pytest.mark.parametrize(("subject", "base", "reply"), BASE_SUBJECTS)
def test_base_subject(subject: str, base: str, reply: bool) -> None:
    got = base_subject(subject)
    assert (got.text, got.is_reply) == (base, reply)


HOSTILE_SUBJECTS: dict[str, Callable[[int], str]] = {
    "re": lambda n: "Re: " * n + "x",
    "re-blob": lambda n: "Re[1]: [list] " * n + "x",
    "blobs": lambda n: "[a]" * n + "x",
    "only-blobs": lambda n: "[a]" * n,
    "fwd-nesting": lambda n: "[fwd: " * n + "x" + "]" * n,
    "fwd-unclosed": lambda n: "[fwd: " * n + "x",
    "trailers": lambda n: "x" + " (fwd)" * n,
    "brackets": lambda n: "[" * n + "x",
    "spaces": lambda n: "Re" + " " * n + "x",
}


def _subject_steps(subject: str) -> int:
    counter = [0]
    base_subject(subject, counter)
    return counter[0] + 1


@pytest.mark.parametrize("kind", sorted(HOSTILE_SUBJECTS))
def test_base_subject_work_is_linear(kind: str) -> None:
    make = HOSTILE_SUBJECTS[kind]
    n = 5000
    small, large = _subject_steps(make(n)), _subject_steps(make(2 * n))
    assert large <= 3 * small, (kind, small, large)
    # Steps per character stay bounded: no hidden rescans.
    assert large <= 4 * len(make(2 * n)) + 10, (kind, large)
    assert_linear(lambda k: base_subject(make(k)), 2000)


def test_base_subject_of_hostile_subjects() -> None:
    assert base_subject("Re: " * 10_000 + "x").text == "x"
    assert base_subject("[fwd: " * 10_000 + "x" + "]" * 10_000).text == "x"
    assert base_subject("[a]" * 10_000).text == "[a]"


def _fields(uid: int, mid: str | None, refs: tuple[str, ...] = (), subject: str = "s",
            irt: str | None = None) -> SortFields:
    b = base_subject(subject)
    return SortFields(uid, float(uid), float(uid), 1, casemap(b.text), b.text, b.is_reply,
                      b"", b"", b"", b"", b"", mid, irt, refs)


def _deep_chain(n: int) -> list[SortFields]:
    """n messages, each replying to the one before (References: all ancestors
    but capped at the last 10, as real clients trim them)."""
    out = []
    for i in range(n):
        refs = tuple(f"<{j}@c>" for j in range(max(0, i - 10), i))
        out.append(_fields(i + 1, f"<{i}@c>", refs))
    return out


def _reversed_chain(n: int) -> list[SortFields]:
    """The same chain delivered newest first: every parent arrives after its
    replies, so each link needs a loop check."""
    return list(reversed([_fields(n - i, f.message_id, f.references)
                          for i, f in enumerate(_deep_chain(n))]))


def _long_references(n: int) -> list[SortFields]:
    """One message whose References names n messages, then each of them."""
    refs = tuple(f"<{j}@r>" for j in range(n))
    return [_fields(1, "<top@r>", refs)] + [_fields(j + 2, f"<{j}@r>") for j in range(n)]


def _cycles(n: int) -> list[SortFields]:
    """Message i says i+1 is its parent, and the last says the first is."""
    return [_fields(i + 1, f"<{i}@y>", (f"<{(i + 1) % n}@y>",)) for i in range(n)]


def _walk_attack(n: int) -> list[SortFields]:
    """A chain n deep, then n messages that each already have a reply and
    name the chain's tail as parent: each link would walk the whole chain."""
    out = [_fields(1, "<deep@a>", tuple(f"<{j}@a>" for j in range(n)))]
    uid = 2
    for i in range(n):
        out.append(_fields(uid, f"<child{i}@a>", (f"<hub{i}@a>",)))
        out.append(_fields(uid + 1, f"<hub{i}@a>", (f"<{n - 1}@a>",)))
        uid += 2
    return out


SHAPES: dict[str, Callable[[int], list[SortFields]]] = {
    "deep-chain": _deep_chain,
    "reversed-chain": _reversed_chain,
    "long-references": _long_references,
    "cycles": _cycles,
    "walk-attack": _walk_attack,
}


def _thread_steps(msgs: list[SortFields]) -> int:
    counter = [0]
    top = references(msgs, counter)
    encode_threads(top, {f.uid: f.uid for f in msgs})
    return counter[0]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_references_work_is_linear(shape: str) -> None:
    make = SHAPES[shape]
    for n in (2000, 4000):
        msgs = make(n)
        steps = _thread_steps(msgs)
        assert steps <= WALK_BUDGET_PER_MESSAGE * len(msgs), (shape, n, steps)
    assert_linear(lambda k: _thread_steps(make(k)), 1000)


def _parse(wire: bytes) -> list[object]:
    """Thread-list bytes -> nested lists (independent of the encoder)."""
    stack: list[list[object]] = [[]]
    num = b""
    for ch in wire + b" ":
        c = bytes([ch])
        if c.isdigit():
            num += c
            continue
        if num:
            stack[-1].append(int(num))
            num = b""
        if c == b"(":
            stack.append([])
        elif c == b")":
            done = stack.pop()
            stack[-1].append(done)
    assert len(stack) == 1
    return stack[0]


def test_deep_chain_threads_as_one_line() -> None:
    msgs = _deep_chain(10_000)
    wire = encode_threads(references(msgs), {f.uid: f.uid for f in msgs})
    assert _parse(wire) == [list(range(1, 10_001))]


def test_reversed_chain_is_the_same_thread() -> None:
    msgs = _reversed_chain(3000)
    wire = encode_threads(references(msgs), {f.uid: f.uid for f in msgs})
    assert _parse(wire) == [list(range(1, 3001))[::-1]]  # uid n is the root


def test_cycles_end() -> None:
    msgs = _cycles(500)
    wire = encode_threads(references(msgs), {f.uid: f.uid for f in msgs})
    flat = [int(x) for x in wire.replace(b"(", b" ").replace(b")", b" ").split()]
    assert sorted(flat) == list(range(1, 501))  # every message once, no loop


def test_repeated_sort_keys_are_dropped() -> None:
    """A key named again changes nothing (its first use broke every tie it
    could) and costs nothing: 1,000 criteria sort like the distinct ones."""
    import random

    from imapd.imap.sortkeys import sort_messages

    rng = random.Random()
    msgs = [
        SortFields(i, float(rng.randint(0, 5)), 0.0, rng.randint(0, 5), b"", "", False,
                   b"", b"", b"", b"", b"", None, None, ())
        for i in range(1, 200)
    ]
    once = sort_messages(msgs, [("SIZE", True), ("ARRIVAL", False)])
    many = [("SIZE", True), ("SIZE", False), ("ARRIVAL", False)] * 500
    assert sort_messages(msgs, many) == once
    assert [m.uid for m in once] == [
        m.uid for m in sorted(msgs, key=lambda m: (-m.size, m.arrival, m.uid))
    ]


def test_sort_fields_extract_only_the_keys_asked_for() -> None:
    """A SORT by DATE decodes no address or subject (most of the per-message
    cost on a big mailbox); asked for, each key is there."""
    from imapd.imap.sortkeys import sort_fields
    from storage.model import Address
    from storage.sortrows import SortRow

    who = (Address("Zed", None, "zed", "x.test"),)
    row = SortRow(7, 1.0, 10, None, "Re: topic", who, who, who, None, None, ())
    by_date = sort_fields(row, {"DATE"})
    got = (by_date.subject, by_date.from_, by_date.display_to, by_date.date)
    assert got == (b"", b"", b"", 1.0)
    full = sort_fields(row)
    assert (full.subject, full.from_, full.to, full.cc) == (b"TOPIC", b"ZED", b"ZED", b"ZED")
    assert (full.display_from, full.is_reply) == (b"ZED", True)
