"""PostgreSQL's word index (schema step 20, ``storage/sql/fts.py``): a
delivery adds one index key per distinct word of its text, not one per
distinct trigram; searches keep RFC 3501 section 6.4.4 semantics (a
case-insensitive substring, also inside a word and across words and
punctuation); a row written without its words (an account move's copy, a
row of an older version) is still found, and the merger fills it."""

from __future__ import annotations

import asyncio
import itertools
import random
import string

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from storage.backend import SqlStorage
from storage.search import Text
from storage.sql import fts
from tests.contract.test_search_freshness import _bob, _deliver, _word


@pytest.fixture(params=["postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _connect(database_url: str) -> asyncpg.Connection:
    u = make_url(database_url)
    return await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)


def _text(words: list[str], count: int) -> str:
    """``count`` words drawn from ``words``, with random case and
    punctuation between them, in lines of under 78 characters."""
    out, line = [], ""
    for _ in range(count):
        word = random.choice(words)
        word = "".join(c.upper() if random.random() < 0.2 else c for c in word)
        piece = word + random.choice([" ", " ", ", ", ". ", "-", "'s "])
        if len(line) + len(piece) > 70:
            out.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join([*out, line.rstrip()])


async def test_a_delivery_adds_a_key_per_distinct_word(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    storage = quiet_storage
    bob = await _bob(storage)
    words = [_word() for _ in range(random.randint(100, 400))]
    body = _text(words, random.randint(300, 900))
    await _deliver(storage, bob, body)
    conn = await _connect(database_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        row = await conn.fetchrow("SELECT * FROM pgstatginindex('messages_search_words')")
        stored = await conn.fetchval("SELECT search_words FROM messages")
        columns = await conn.fetchrow(
            "SELECT subject, from_text, to_text, cc_text, body_text FROM messages"
        )
        trigrams = await conn.fetchval("SELECT cardinality(show_trgm($1))", body)
    finally:
        await conn.close()
    distinct = {w.lower() for w in words if w.lower() in body.lower()}
    # The message's words (its subject, addresses and body) and only they.
    assert {fts.word_hash(w.encode()) for w in distinct} <= set(stored)
    assert stored == fts.message_index(dict(columns))[0]
    assert {fts.word_hash(w) for w in fts.message_words(columns)} <= set(stored)
    # In the pending list, for the merger (no delivery merged it).
    assert row["pending_tuples"] == 1
    # Several times fewer keys than the trigram index of step 14 added.
    assert len(stored) * 3 < trigrams


def _lower(text: str) -> str:
    """``text`` lowercased as PostgreSQL's lower() does it (where Python's
    differs: the capital I with a dot is a plain i there)."""
    return text.lower().replace("i\u0307", "i")


async def test_substrings_are_found_as_the_exact_test_finds_them(quiet_storage: SqlStorage) -> None:
    storage = quiet_storage
    bob = await _bob(storage)
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    words = [_word() for _ in range(random.randint(30, 60))]
    bodies = [_text(words, random.randint(5, 60)) for _ in range(random.randint(8, 16))]
    # Characters PostgreSQL's lower() maps to ASCII letters: the Kelvin sign
    # (k) and the capital I with a dot (i).
    bodies.append(f"the \u212aelvin and \u0130stanbul {random.choice(words)}")
    for body in bodies:
        await _deliver(storage, bob, body)
    values = ["kelvin", "istanbul", "elvin and ist"]
    for _ in range(40):
        body = random.choice(bodies)
        start = random.randrange(len(body))
        values.append(body[start : start + random.randint(3, 25)].swapcase())
    for value in values:
        if not value.isascii() or not value.strip() or "\n" in value:
            continue
        expected = [i for i, body in enumerate(bodies, start=1) if value.lower() in _lower(body)]
        assert await mail.search(bob.id, inbox, Text("body", value)) == expected, value


async def test_a_row_without_its_words_is_found_and_filled(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    storage = quiet_storage
    bob = await _bob(storage)
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    # Words no other message has: the vocabulary gets them from the merger.
    markers = ["".join(random.choices(string.ascii_lowercase, k=20)) for _ in range(5)]
    for marker in markers:
        await _deliver(storage, bob, f"{_word()} {marker} {_word()}")
    conn = await _connect(database_url)
    try:
        # As an account move copies a row (the columns of ``messages``).
        await conn.execute("UPDATE messages SET search_words = NULL")
        await conn.execute("DELETE FROM search_vocab")
        for uid, marker in enumerate(markers, start=1):
            assert await mail.search(bob.id, inbox, Text("body", marker[3:15])) == [uid]
        indexer = storage.databases["default"].indexer()
        assert indexer is not None
        await indexer.run_once()
        assert await conn.fetchval("SELECT count(*) FROM messages WHERE search_words IS NULL") == 0
    finally:
        await conn.close()
    for uid, marker in enumerate(markers, start=1):
        assert await mail.search(bob.id, inbox, Text("body", marker[3:15])) == [uid]


async def test_long_texts_are_compressed_with_lz4(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    """Schema step 21: a delivered message's long texts are LZ4, not pglz."""
    storage = quiet_storage
    bob = await _bob(storage)
    words = [_word() for _ in range(random.randint(50, 200))]
    await _deliver(storage, bob, _text(words, random.randint(600, 1500)))
    conn = await _connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT pg_column_compression(parsed) AS parsed, "
            "pg_column_compression(body_text) AS body FROM messages"
        )
    finally:
        await conn.close()
    assert row["body"] == "lz4"
    assert row["parsed"] in (None, "lz4")  # None: short enough to stay as it is


async def test_step_20_indexes_the_rows_already_stored(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    """A database at schema version 19 (a trigram index, no words) gets
    its stored rows' words in the migration: none is left to scan."""
    from storage.sql.db import Database

    storage = quiet_storage
    bob = await _bob(storage)
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    markers = [_word() + _word() for _ in range(random.randint(3, 8))]
    for marker in markers:
        words = [_word() for _ in range(20)]
        await _deliver(storage, bob, f"{_text(words, 30)} {marker}, {_text(words, 20)}")
    conn = await _connect(database_url)
    try:
        # Back to what version 19 left: no word column, vocabulary or index.
        await conn.execute(
            "DROP INDEX messages_search_words; DROP INDEX messages_search_unindexed; "
            "ALTER TABLE messages DROP COLUMN search_words; DROP TABLE search_vocab; "
            "DELETE FROM schema_version WHERE version >= 20"
        )
        db = Database(database_url)
        try:
            await db.migrate()
        finally:
            await db.close()
        unindexed = await conn.fetchval("SELECT count(*) FROM messages WHERE search_words IS NULL")
    finally:
        await conn.close()
    assert unindexed == 0
    for uid, marker in enumerate(markers, start=1):
        assert await mail.search(bob.id, inbox, Text("body", marker[2:-2])) == [uid]


async def test_filling_rows_lets_the_event_loop_turn_between_rows(
    quiet_storage: SqlStorage, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row holds up to 1 MB of text (some 40 ms of word extraction) and a
    batch up to UNINDEXED_BATCH rows: the merger, which runs on a daemon's
    event loop, must let the loop's other sessions in between rows, not
    once per batch (seconds)."""
    storage = quiet_storage
    bob = await _bob(storage)
    count = random.randint(3, 8)
    for _ in range(count):
        await _deliver(storage, bob, _text(list(string.ascii_lowercase), 50))
    conn = await _connect(database_url)
    try:
        await conn.execute("UPDATE messages SET search_words = NULL")
    finally:
        await conn.close()
    order: list[str] = []
    real = fts.message_words

    def words(values: dict[str, object]) -> set[bytes]:
        order.append("row")
        return real(values)

    async def other_session() -> None:
        while True:
            order.append("turn")
            await asyncio.sleep(0)

    monkeypatch.setattr(fts, "message_words", words)
    ticker = asyncio.create_task(other_session())
    try:
        async with storage.databases["default"].engine.begin() as c:
            assert await fts.index_unindexed(c) == count
    finally:
        ticker.cancel()
    rows = [i for i, what in enumerate(order) if what == "row"]
    assert len(rows) == count
    # Another session ran between every two rows.
    assert all("turn" in order[a + 1 : b] for a, b in itertools.pairwise(rows))


async def test_a_word_longer_than_an_index_entry_is_delivered_and_found(
    quiet_storage: SqlStorage, database_url: str
) -> None:
    """A run of letters and digits longer than a B-tree entry may hold
    (2,704 bytes: a hex dump, base64 pasted into a text part) made every
    delivery of the message fail (451, forever). It is delivered, and its
    substrings, short or longer than a vocabulary word, are found; also
    once the merger filled a row written without its words."""
    storage = quiet_storage
    bob = await _bob(storage)
    mail = storage.mail(bob)
    inbox = (await mail.get_mailbox(bob.id, "INBOX")).id
    alphabet = string.ascii_lowercase + string.digits
    long_word = "".join(random.choices(alphabet, k=random.randint(2_800, 6_000)))
    short_word = _word()
    await _deliver(storage, bob, f"{_word()} {short_word}\n{long_word}\n{_word()}")
    await _deliver(storage, bob, f"{_word()} {_word()}")  # not a match
    start = random.randrange(0, 2_000)
    probes = [
        long_word[start : start + random.randint(3, 40)],
        long_word[start : start + random.randint(fts.VOCAB_MAX_LENGTH + 1, 700)].upper(),
        short_word,
    ]
    for probe in probes:
        assert await mail.search(bob.id, inbox, Text("body", probe)) == [1], probe
    conn = await _connect(database_url)
    try:
        await conn.execute("UPDATE messages SET search_words = NULL")
        indexer = storage.databases["default"].indexer()
        assert indexer is not None
        await indexer.run_once()
        assert await conn.fetchval("SELECT count(*) FROM messages WHERE search_words IS NULL") == 0
        assert await conn.fetchval("SELECT max(length(word)) FROM search_vocab") <= (
            fts.VOCAB_MAX_LENGTH
        )
    finally:
        await conn.close()
    for probe in probes:
        assert await mail.search(bob.id, inbox, Text("body", probe)) == [1], probe
