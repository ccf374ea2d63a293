"""PostgreSQL decides most text-search candidates from their word hashes
(schema step 38, ``criteria.pg_sure_condition``): a row whose hashes show
a word holding the searched word, with no other vocabulary word under that
hash, is a match without its text being read. Exactness first: the results
equal a brute-force substring check (RFC 3501 section 6.4.4, as the exact
SQL test decides it) over texts holding words inside longer words, CRC-32
collisions (plain, and between a word and another's header twin), the
Kelvin sign and the capital I with a dot, words too long for the
vocabulary, and words only in a header or only in the body."""

from __future__ import annotations

import random
import string
import zlib
from typing import Any

from storage.backend import SqlStorage
from storage.ingest import Delivery, ingest
from storage.model import Account
from storage.search import Or, Text
from storage.sql import fts
from tests.contract.mailfactory import build
from tests.contract.test_pg_word_index import _connect, _lower
from tests.contract.test_pg_word_index import backend as backend  # PostgreSQL only
from tests.contract.test_search_freshness import _bob


def _word(k: int = 8) -> str:
    return "".join(random.choices(string.ascii_lowercase, k=k))


def _collisions() -> tuple[tuple[str, str], tuple[str, str]]:
    """Two pairs of distinct ASCII words found by brute force (a birthday
    search, some 10^5 words): one whose CRC-32s are equal, one where the
    first's CRC-32 is the second's header twin (``fts.header_hash``)."""
    seen: dict[int, str] = {}
    same: tuple[str, str] | None = None
    twin: tuple[str, str] | None = None
    while same is None or twin is None:
        word = _word(9)
        h = fts.word_hash(word.encode())
        if same is None and seen.get(h, word) != word:
            same = (seen[h], word)
        partner = seen.get(fts.header_hash(h))
        if twin is None and partner is not None and partner != word:
            twin = (word, partner)  # hash(word) == header_hash(hash(partner))
        seen[h] = word
    assert zlib.crc32(same[0].encode()) == zlib.crc32(same[1].encode())
    return same, twin


async def _inbox(storage: SqlStorage) -> tuple[Account, Any, int]:
    """Bob, his mail store and his INBOX's id."""
    bob = await _bob(storage)
    mail = storage.mail(bob)
    return bob, mail, (await mail.get_mailbox(bob.id, "INBOX")).id


async def _deliver(storage: SqlStorage, bob: Account, subject: str, body: str) -> None:
    raw, _ = build(subject=subject, body=body)
    await ingest(storage, [Delivery(bob)], raw)


def _phrase(words: list[str], count: int) -> str:
    out = []
    for _ in range(count):
        word = random.choice(words)
        out.append("".join(c.upper() if random.random() < 0.2 else c for c in word))
    return " ".join(out)


async def _columns(database_url: str) -> dict[int, tuple[str, ...]]:
    """Each message's searched columns by its UID in INBOX (one mailbox)."""
    conn = await _connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT e.uid, m.subject, m.from_text, m.to_text, m.cc_text, m.body_text "
            "FROM mailbox_entries e JOIN messages m ON m.id = e.message_id ORDER BY e.uid"
        )
    finally:
        await conn.close()
    return {r["uid"]: tuple(r[k] for k in ("subject", "from_text", "to_text", "cc_text",
                                           "body_text")) for r in rows}


async def test_hash_decisions_agree_with_a_brute_force_substring_check(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    storage = quiet_storage
    bob, mail, inbox = await _inbox(storage)
    (same_a, same_b), (twin_a, twin_b) = _collisions()
    base = [_word(random.randint(4, 7)) for _ in range(12)]
    # Words inside longer words: a search for ``base[0]`` also finds these.
    longer = [f"{_word(3)}{w}" for w in base[:4]] + [f"{w}{_word(2)}" for w in base[4:8]]
    long_word = "".join(random.choices(string.ascii_lowercase, k=fts.VOCAB_MAX_LENGTH + 50))
    body_only, header_only = _word(10), _word(10)
    many = [_word(9) for _ in range(fts.TWIN_SLOTS + 5)]
    texts: list[tuple[str, str]] = []
    for _ in range(random.randint(20, 30)):
        pool = base + longer
        texts.append((_phrase(pool, random.randint(1, 4)), _phrase(pool, random.randint(3, 30))))
    specials = [
        (f"note {same_a}", f"{_phrase(base, 5)} {header_only[:4]}"),  # same_a only in a header
        ("note", f"{_phrase(base, 3)} {same_b}"),  # same_b in a body: same hash as same_a
        ("note", f"{_phrase(base, 3)} {same_a.upper()}"),
        (f"{twin_b} news", f"{_phrase(base, 3)}"),  # header twin of twin_b == hash of twin_a
        ("news", f"{_phrase(base, 3)} {twin_a}"),
        (f"about {header_only}", _phrase(base, 4)),
        ("about", f"{_phrase(base, 4)} {body_only}"),
        ("kelvin", f"the \u212a{base[0][1:]} and \u0130{base[1][1:]} {base[2]}"),
        ("dotted", f"I\u0307{base[3][1:]} {base[4]}"),
        ("long", f"{base[5]} {long_word} {base[6]}"),
        (f"{base[7].upper()} in the subject only", "nothing here at all"),
        (" ".join([*many, base[8]]), f"{many[0]} {_phrase(base, 3)}"),
    ]
    texts += specials
    random.shuffle(texts)
    for subject, body in texts:
        await _deliver(storage, bob, subject, body)
    columns = await _columns(database_url)
    values = [*base, *longer, same_a, same_b, twin_a, twin_b, body_only, header_only,
              base[0][1:], base[3][1:], long_word[20:60], long_word[: fts.VOCAB_MAX_LENGTH + 10],
              "kelvin", header_only[:4], same_a[2:7], *many[:3], many[-1]]
    for value in values:
        for probe in (value, value.upper()):
            needle = probe.lower()
            in_body = [u for u, c in columns.items() if needle in _lower(c[4])]
            in_any = [u for u, c in columns.items() if any(needle in _lower(t) for t in c)]
            assert await mail.search(bob.id, inbox, Text("body", probe)) == in_body, probe
            assert await mail.search(bob.id, inbox, Text("content", probe)) == in_any, probe
            either = Or(Text("body", probe), Text("body", "zzzqqq"))
            assert await mail.search(bob.id, inbox, either) == in_body, probe
            found = await mail.search_account(bob.id, Text("content", probe), limit=1000)
            assert sorted(e.uid for e in found) == in_any, probe


async def test_sure_rows_are_decided_without_their_text(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    """The mechanism itself: with each row's text changed behind the index's
    back (the hashes kept), a row the hashes decide is still found, and
    every row they cannot decide goes to the exact test (not found)."""
    storage = quiet_storage
    bob, mail, inbox = await _inbox(storage)
    (same_a, same_b), _ = _collisions()
    word, head, kelvin = _word(9), _word(9), _word(9)
    many = [_word(9) for _ in range(fts.TWIN_SLOTS + 5)]
    # The header word whose twin lies last, beyond the slots a search looks at.
    last = max(many, key=lambda w: fts.header_hash(fts.word_hash(w.encode())))
    cases = [
        ("a", f"some {word}s here"),  # 1: sure, inside a longer word
        ("b", f"some {same_b} here"),  # 2: same_a's hash: never sure for same_a
        (f"{head} c", "plain"),  # 3: a header word: not sure for BODY
        ("d", f"\u212a {kelvin}"),  # 4: FOLDS: never sure
        ("e", f"more {word}"),  # 5: untagged below: never sure
        ("f", f"and {same_a}"),  # 6: same_a itself, but same_b shares its hash
        (" ".join(many), "plain"),  # 7: more header words than TWIN_SLOTS: never sure
    ]
    for subject, body in cases:
        await _deliver(storage, bob, subject, body)
    conn = await _connect(database_url)
    try:
        # As a row indexed before step 38: no flag first.
        await conn.execute(
            "UPDATE messages SET search_words = search_words[2:] WHERE body_text LIKE 'more %'"
        )
        await conn.execute("UPDATE messages SET body_text = 'xxx', subject = 'yyy'")
    finally:
        await conn.close()
    assert await mail.search(bob.id, inbox, Text("body", word)) == [1]
    assert await mail.search(bob.id, inbox, Text("content", word.upper())) == [1]
    assert [e.uid for e in await mail.search_account(bob.id, Text("content", word))] == [1]
    assert await mail.search(bob.id, inbox, Text("body", same_a)) == []
    assert await mail.search(bob.id, inbox, Text("body", head)) == []
    assert await mail.search(bob.id, inbox, Text("content", head)) == [3]
    assert await mail.search(bob.id, inbox, Text("body", kelvin)) == []
    assert await mail.search(bob.id, inbox, Text("body", last)) == []
    assert await mail.search(bob.id, inbox, Text("content", last)) == []


async def test_rows_indexed_before_step_38_are_indexed_again(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    storage = quiet_storage
    bob, mail, inbox = await _inbox(storage)
    words = [_word(9) for _ in range(random.randint(3, 8))]
    for w in words:
        await _deliver(storage, bob, f"on {w}", f"{_word()} {w} {_word()}")
    conn = await _connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, subject, from_text, to_text, cc_text, body_text "
                                "FROM messages")
        for row in rows:  # as step 20 indexed them: the words' hashes only
            old = sorted({fts.word_hash(w) for w in fts.message_words(dict(row))})
            await conn.execute("UPDATE messages SET search_words = $1 WHERE id = $2",
                               old, row["id"])
        untagged = f"SELECT count(*) FROM messages WHERE {fts.untagged_predicate()}"
        assert await conn.fetchval(untagged) == len(words)
        for uid, w in enumerate(words, start=1):  # found meanwhile, by the exact test
            assert await mail.search(bob.id, inbox, Text("body", w)) == [uid]
        indexer = storage.databases["default"].indexer()
        assert indexer is not None
        await indexer.run_once()
        assert await conn.fetchval(untagged) == 0
        for row in rows:
            stored = await conn.fetchval("SELECT search_words FROM messages WHERE id = $1",
                                         row["id"])
            assert stored == fts.message_index(dict(row))[0]
    finally:
        await conn.close()
    for uid, w in enumerate(words, start=1):
        assert await mail.search(bob.id, inbox, Text("body", w)) == [uid]
        assert await mail.search(bob.id, inbox, Text("content", w)) == [uid]
