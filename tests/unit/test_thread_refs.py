"""imapd.imap.thread_refs (THREAD=REFERENCES on flat lists, issue #24)
gives exactly the answer of the reference implementation,
``encode_threads(references(...))`` of imapd.imap.threads (RFC 5256
section 4), on random forests of random sizes: replies with full,
truncated and missing References, In-Reply-To only, IDs seen only as
references (dummies), duplicate and self-referencing IDs, reference loops,
IDs that need the JSON form, subjects shared between threads (step 4),
reply marks, equal dates and UIDs with gaps."""

from __future__ import annotations

import random

import pytest

from imapd.imap.thread_refs import references_response
from imapd.imap.threads import encode_threads, references
from storage.sortkeys import ThreadInput, ThreadRow, encode_thread_ids, thread_input


def _forest(rng: random.Random, n: int) -> list[ThreadRow]:
    """``n`` messages in UID order: a random forest of replies, damaged in
    the ways real and hostile mail is."""
    subjects = [b"", *(f"topic {k}".upper().encode() for k in range(rng.randint(1, 12)))]
    ids = [f"<m{k}.{rng.randrange(10**6)}@example.org>" for k in range(n)]
    chains: list[list[str]] = []  # each message's own References chain
    rows: list[ThreadRow] = []
    uid = 0
    for k in range(n):
        uid += rng.choice((1, 1, 1, 2, 7))
        own: str | None = ids[k]
        roll = rng.random()
        if roll < 0.05:
            own = None  # missing or invalid Message-ID
        elif roll < 0.1 and k:
            own = ids[rng.randrange(k)]  # a duplicate of an earlier one
        elif roll < 0.13:
            own = f'<"odd\\"{k}"@example.org>\n' if rng.random() < 0.5 else f"<\x00{k}@x>"
        refs: list[str] = []
        if k and rng.random() < 0.7:
            p = rng.randrange(k)
            refs = [*chains[p], ids[p]]
            roll = rng.random()
            if roll < 0.15:
                refs = refs[-rng.randint(1, 2) :]  # truncated References
            elif roll < 0.25:
                refs.insert(rng.randrange(len(refs) + 1), f"<lost{rng.randrange(20)}@x>")
            elif roll < 0.3:
                refs.append(ids[rng.randrange(n)])  # a later message, maybe a loop
            elif roll < 0.33 and own is not None:
                refs.append(own)  # references itself
        elif rng.random() < 0.1:
            refs = [f"<lost{rng.randrange(20)}@x>"]  # parent never seen: a dummy
        chains.append(refs)
        subject = rng.choice(subjects)
        date = float(rng.randrange(max(2, n // 3)))  # many equal dates
        rows.append((uid, date, subject, rng.random() < 0.4, encode_thread_ids(own, refs)))
    return rows


def _reference_answer(rows: list[ThreadRow], numbers: list[int]) -> bytes:
    fields, ids = thread_input(rows)
    number = {f.uid: m for f, m in zip(fields, numbers, strict=True)}
    return encode_threads(references(fields, ids=ids), number)


@pytest.mark.parametrize("seed", range(60))
def test_same_answer_as_the_reference_on_random_forests(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice((0, 1, 2, rng.randint(3, 30), rng.randint(30, 400), rng.randint(400, 3000)))
    rows = _forest(rng, n)
    numbers = [rng.randrange(1, 10**6) for _ in rows]
    got = references_response(rows, numbers)
    assert got == _reference_answer(rows, numbers)
    if n > 3:
        assert got.count(b"(") == got.count(b")") > 0


def test_numbers_name_the_messages() -> None:
    """One thread of three, a lone message: the numbers given are written."""
    rows: list[ThreadRow] = [
        (10, 1.0, b"A", False, "<a@x>"),
        (11, 2.0, b"A", True, "<b@x>\n<a@x>"),
        (12, 3.0, b"B", False, "<c@x>"),
        (13, 4.0, b"A", True, "<d@x>\n<a@x>\n<b@x>"),
    ]
    assert references_response(rows, [7, 8, 9, 5]) == b"(7 8 5)(9)"


def test_hostile_chains_cost_the_same_bounded_walks() -> None:
    """Every message referencing a deep chain: the loop checks take the
    reference's steps (its shared budget), not n * depth."""
    n = 3000
    chain = [f"<c{k}@x>" for k in range(n)]
    rows: list[ThreadRow] = [
        (k + 1, float(k), b"S", False, encode_thread_ids(chain[k], chain[:k][::-1]))
        for k in range(n)
    ]
    fields: list[ThreadInput]
    fields, ids = thread_input(rows)
    expected = [0]
    old = encode_threads(references(fields, expected, ids=ids), {f.uid: f.uid for f in fields})
    got = [0]
    assert references_response(rows, [r[0] for r in rows], got) == old
    assert got == expected
    assert got[0] <= 64 * n
