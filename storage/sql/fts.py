"""The full-text indexes' background work: SQLite's index, in a file of its
own, filled in the background (:class:`FtsIndexer`), and PostgreSQL's
word index (schema step 20, the end of this module), whose pending list is
merged in the background (:class:`PendingListMerger`).

Why apart: the trigram index was kept in step by a trigger, so every
delivery tokenised its text inside the writer's transaction, about two
thirds of the time a delivery holds the database's single write lock.
Now a delivery only queues its message id (``fts_pending``, a trigger of
schema step 6), and an indexer fills the index in ``<db>-fts``, a second
SQLite file with its own write lock, in batches and off the delivery's
latency. Dovecot indexes lazily too (at search time).

Contract (what search relies on, ``criteria._text_condition``): every live
message holding a substring is either in the index under all the
substring's trigrams, or still queued in ``fts_pending``. So a search
takes the index's matches plus the queued ids as candidates and decides by
an exact comparison; the index may hold stale entries (a message deleted
while it was being indexed), which only cost a wasted comparison.

- A delivery inserts its id into ``fts_pending`` (trigger ``fts_queue``).
- Deleting a message row removes its queued id; if it was indexed already,
  the values it was indexed with go to ``fts_deleted`` (trigger
  ``fts_unqueue``), because the index is contentless (no copy of the text)
  and FTS5 removes a row of such an index only given those values.
- :class:`FtsIndexer` runs batches: under a file lock that keeps the
  indexers of every process on this host from doing the same work, it
  applies the queued deletions, then indexes queued messages, commits the
  index file (fsynced), and only then removes what it did from the two
  queues. A crash between the two commits indexes some messages twice,
  which is harmless; nothing is ever dropped from the queue unindexed.
  Deletions go first so that a message id SQLite hands out again (it
  reuses the highest id after its row is deleted) is indexed after the old
  message's entries are gone.

Readers (:meth:`Database.read_sync`) see the index as the attached schema
``fts``. The database's own writer connections never attach it: a
``BEGIN IMMEDIATE`` locks every attached file, which would put the index
back under the delivery's lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from storage.tasks import stop_task

log = logging.getLogger(__name__)

COLUMNS = "subject, from_text, to_text, cc_text, body_text"
# Messages one batch indexes: large enough to amortise the commit, small
# enough that a batch holds the index's lock only a fraction of a second.
BATCH = 500
# How often an idle indexer looks at the queue (seconds). A delivery does
# not wake it: searches cover queued messages, so there is no hurry, and
# batching is what makes the index cheap.
POLL_SECONDS = 1.0
BUSY_TIMEOUT_S = 30.0


def index_file(db_file: str) -> str:
    """The index file of the SQLite database file ``db_file``."""
    return f"{db_file}-fts"


def attach(dbapi_conn: Any, db_file: str) -> None:
    """Attach the index of ``db_file`` to a reading connection as ``fts``."""
    dbapi_conn.execute("ATTACH DATABASE ? AS fts", (index_file(db_file),))


def create_index(db_file: str) -> bool:
    """Create the index file and its table if missing (blocking; run in a
    thread). Returns True when the table was missing: the caller then
    queues every stored message (a lost or deleted index file is rebuilt)."""
    conn = sqlite3.connect(index_file(db_file), isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone()
        conn.execute("PRAGMA journal_mode=WAL")
        # Trigram tokens for substring search; detail=none: search only
        # needs which rows hold every trigram (the exact check decides);
        # content='': no copy of the text, which stays in ``messages``.
        conn.execute(
            f"CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5({COLUMNS}, "
            "content='', tokenize='trigram', detail=none)"
        )
        return found is None
    finally:
        conn.close()


class _Background:
    """A worker that runs :meth:`_run` as a task of the running loop from
    :meth:`start` until :meth:`_stop` (idempotent both)."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)  # a cancellation may be lost once
            self._task = None


class FtsIndexer(_Background):
    """Fills the index of one SQLite database from its queue.

    ``clear(pending_seq, deleted_rowid)``: an async function that removes,
    in the main database, the queue rows up to those (inclusive; None for
    none) and returns when that is committed (the :class:`Database` passes
    a non-durable batched write). :meth:`start` runs batches in a
    background task until :meth:`close`; :meth:`run_once` runs one batch
    (every queued deletion, up to ``batch`` queued messages) and returns
    how many messages it indexed.
    """

    def __init__(
        self,
        db_file: str,
        clear: Callable[[int | None, int | None], Awaitable[None]],
        batch: int = BATCH,
    ) -> None:
        self.db_file = db_file
        self.batch = batch
        self._clear = clear
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._closed = False
        # One thread: the connection is used from it only.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fts-indexer"
        )

    async def _run(self) -> None:
        while True:
            try:
                done = await self.run_once()
            except Exception:
                log.exception("full-text indexing failed; retrying")
                done = 0
            if done < self.batch:
                await asyncio.sleep(POLL_SECONDS)

    async def run_once(self) -> int:
        loop = asyncio.get_running_loop()
        marks = await loop.run_in_executor(self._executor, self._index_locked)
        if marks is None:
            return 0
        try:
            pending_seq, deleted_rowid, count = marks
            await self._clear(pending_seq, deleted_rowid)
            return count
        finally:
            await loop.run_in_executor(self._executor, self._unlock)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                index_file(self.db_file),
                isolation_level=None,
                timeout=BUSY_TIMEOUT_S,
                check_same_thread=False,  # closed from close(), after the thread
            )
            conn.execute("PRAGMA synchronous=FULL")  # committed before the queue is cleared
            conn.execute("ATTACH DATABASE ? AS mail", (self.db_file,))
            self._conn = conn
            self._lock_fd = os.open(
                f"{index_file(self.db_file)}-indexer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        return self._conn

    def _index_locked(self) -> tuple[int | None, int | None, int] | None:
        """In the indexer thread: takes the indexers' lock, indexes one
        batch and commits it. Returns the queue marks to clear and the
        count, with the lock still held (:meth:`_unlock` releases it), or
        None (lock released) when the queue is empty."""
        conn = self._connect()
        assert self._lock_fd is not None
        try:
            # Non-blocking: a holder is another process's indexer, which is
            # doing this work already; waiting here would also hold up close().
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            marks = self._index_batch(conn)
        except BaseException:
            self._unlock()
            raise
        if marks is None:
            self._unlock()
        return marks

    def _index_batch(self, conn: sqlite3.Connection) -> tuple[int | None, int | None, int] | None:
        """One batch in one transaction of the index file, committed; None
        (and nothing written) when both queues are empty."""
        # Deferred BEGIN: the first write locks the index file only; the
        # attached database is only read (a WAL snapshot).
        conn.execute("BEGIN")
        try:
            rows = conn.execute(
                "SELECT seq FROM mail.fts_pending ORDER BY seq LIMIT ?", (self.batch,)
            ).fetchall()
            pending_seq = rows[-1][0] if rows else None
            deleted_rowid = conn.execute("SELECT max(rowid) FROM mail.fts_deleted").fetchone()[0]
            if pending_seq is None and deleted_rowid is None:
                conn.execute("ROLLBACK")
                return None
            if deleted_rowid is not None:
                conn.execute(
                    f"INSERT INTO messages_fts(messages_fts, rowid, {COLUMNS}) "
                    f"SELECT 'delete', message_id, {COLUMNS} FROM mail.fts_deleted "
                    "WHERE rowid <= ?",
                    (deleted_rowid,),
                )
            if pending_seq is not None:
                conn.execute(
                    f"INSERT INTO messages_fts(rowid, {COLUMNS}) "
                    f"SELECT id, {COLUMNS} FROM mail.messages WHERE id IN "
                    "(SELECT message_id FROM mail.fts_pending WHERE seq <= ?)",
                    (pending_seq,),
                )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return pending_seq, deleted_rowid, len(rows)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def close(self) -> None:
        """Stops the background task and closes the connection. A batch in
        progress is interrupted and rolls back (its rows stay queued for
        the next start), so closing never waits for a long batch.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._conn is not None:
            self._conn.interrupt()  # thread-safe; ends a running statement
        await self._stop()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


# How often PostgreSQL's pending list is merged (seconds), and how long to
# wait after a failed merge (a standby, a lost server) before the next try.
MERGE_SECONDS = 1.0
MERGE_RETRY_SECONDS = 30.0


class PendingListMerger(_Background):
    """PostgreSQL: merges the word index's pending list into the index,
    in the background, so that no delivery does it inline.

    A delivery only appends its message's word hashes to the GIN index's
    pending list (schema steps 17 and 20); a search reads that list as well
    as the index, so a message is found as soon as its delivery committed,
    merged or not. Merging sorts the list and adds each word's messages to
    the index at once, far less work per message than an insert into the
    index proper. Each merge first fills the words of a batch of rows
    written without them (:func:`index_unindexed`). ``merge()`` runs one
    merge (``Database.merge_search_index``) and returns how many pending
    pages it merged. Every instance of a site runs one; PostgreSQL lets one
    merge run at a time and the others return."""

    def __init__(self, merge: Callable[[], Awaitable[int]]) -> None:
        self._merge = merge

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("merging the search index's pending list failed: %s", exc)
                await asyncio.sleep(MERGE_RETRY_SECONDS)
            else:
                await asyncio.sleep(MERGE_SECONDS)

    async def run_once(self) -> int:
        """One merge; the pending pages it merged (0: none were pending)."""
        return await self._merge()

    async def close(self) -> None:
        """Stops the background task (a merge in progress is cancelled: the
        server finishes or rolls back its own transaction)."""
        await self._stop()


# PostgreSQL's word index (schema step 20). A message row carries the
# hashes of its distinct words (``messages.search_words``, int4[], a GIN
# index); ``search_vocab`` holds every word once with its hash, under a
# trigram index. A substring search finds the vocabulary words holding
# each of its own words (a trigram LIKE on the small vocabulary), then the
# messages carrying one of their hashes, then decides by an exact
# comparison (``criteria._text_condition``). A delivery so adds one GIN
# key per distinct word instead of one per distinct trigram (several times
# fewer, and integers), and pays trigrams only for words never seen before.
#
# Contract: a "word" is a maximal run of ASCII letters and digits, at least
# VOCAB_MIN_LENGTH long, in the text lowercased by Python. Every ASCII
# substring of a message's text (case-insensitive, as PostgreSQL's lower()
# and ILIKE see it) has each of its own words inside one of the message's
# words: Python's lower() maps to ASCII every character PostgreSQL's does
# (K, the Kelvin sign; U+0130 gives "i" plus a combining dot, which only
# ends a word early, so that pair is joined back first). Hash collisions
# only add candidates. A row whose ``search_words`` is NULL (written by a
# path that does not compute them: an older version, an account move) is
# always a candidate, through a partial index, until
# ``index_unindexed_sync`` fills it.
VOCAB_MIN_LENGTH = 3
# Longer words (a hex digest of a few hundred digits, base64 pasted into a
# text part) are not vocabulary words: a B-tree entry holds at most 2,704
# bytes, and a delivery carrying a 4,000-letter word failed with 451 on
# every attempt. A row holding one carries LONG_WORD's hash instead, and
# every search takes such rows as candidates (the exact test decides).
VOCAB_MAX_LENGTH = 200
LONG_WORD = b"~long~"  # never a word (not a letter or digit): only a marker
_WORD_BYTES = bytes(c if (48 <= c <= 57 or 97 <= c <= 122) else 32 for c in range(256))


def words_of(text: str) -> set[bytes]:
    """The distinct words of ``text`` (ASCII bytes), linear in its length."""
    lowered = text.lower()
    if "\u0307" in lowered:
        lowered = lowered.replace("i\u0307", "i")
    return {
        w
        for w in lowered.encode("utf-8", "surrogatepass").translate(_WORD_BYTES).split()
        if len(w) >= VOCAB_MIN_LENGTH
    }


def word_hash(word: bytes) -> int:
    """The int4 a word is indexed under (CRC-32, signed)."""
    h = zlib.crc32(word)
    return h - 0x1_0000_0000 if h >= 0x8000_0000 else h


def message_words(values: dict[str, Any]) -> set[bytes]:
    """The words of a ``messages`` row's searched columns (``values``) that
    it is indexed under: those of at most VOCAB_MAX_LENGTH, and LONG_WORD
    in place of any longer ones."""
    words = words_of(
        " ".join(
            values[k] or "" for k in ("subject", "from_text", "to_text", "cc_text", "body_text")
        )
    )
    long = {w for w in words if len(w) > VOCAB_MAX_LENGTH}
    return (words - long) | {LONG_WORD} if long else words


# Schema step 38: what lets a search decide most candidates from the row's
# hashes alone, without reading its text (``criteria.pg_sure_condition``).
# The row's ``search_words`` array is laid out as:
# 1. a flag: READY's hash, or TAGGED's when the row is indexed this way but
#    not READY (a searched column holds a character that makes
#    ``words_of`` see ASCII letters the text does not hold as such: Python
#    lowers U+0130 and U+212A to ASCII, and U+0307 after an i is dropped; or
#    a word longer than VOCAB_MAX_LENGTH; or more than TWIN_SLOTS - 1
#    header words). A row indexed before step 38 has neither there, and a
#    row not READY is always decided by the exact test;
# 2. the tagged twins (hash XOR HEADER_TAG) of the words of its subject,
#    From, To and Cc, sorted: a hash whose twin is absent came from the
#    body (a header word brings both). In a READY row they all lie within
#    the first TWIN_SLOTS elements, so a search checks them there (a
#    subscript and a short slice) instead of scanning the whole array;
# 3. every word's hash (:func:`message_words`), sorted, as before step 38:
#    older code reading the row finds what it always found.
HEADER_TAG = 0x2F6B_5A1D
READY = b"~ready~"  # never a word, as LONG_WORD
TAGGED = b"~tagged~"
TWIN_SLOTS = 64
_FOLDING = ("\u0130", "\u212a", "\u0307")
HEADER_KEYS = ("subject", "from_text", "to_text", "cc_text")


def header_hash(h: int) -> int:
    """The tagged twin of the hash ``h`` (int4 XOR, as SQL's ``h # HEADER_TAG``)."""
    return h ^ HEADER_TAG


def marker_hashes() -> tuple[int, int, int]:
    """The hashes of LONG_WORD, READY and TAGGED: never taken as a word's."""
    return word_hash(LONG_WORD), word_hash(READY), word_hash(TAGGED)


def _folds(text: str) -> bool:
    return not text.isascii() and any(c in text for c in _FOLDING)


def message_index(values: dict[str, Any]) -> tuple[list[int], set[bytes]]:
    """What a ``messages`` row's ``search_words`` holds, in the layout above
    (flag, twins, hashes), and its words for the vocabulary (LONG_WORD
    left out)."""
    words = message_words(values)
    vocab = words - {LONG_WORD}
    header = words_of(" ".join(values[k] or "" for k in HEADER_KEYS)) & vocab
    twins = sorted({header_hash(word_hash(w)) for w in header})
    ready = (
        LONG_WORD not in words
        and len(twins) < TWIN_SLOTS
        and not any(_folds(values[k] or "") for k in (*HEADER_KEYS, "body_text"))
    )
    flag = word_hash(READY if ready else TAGGED)
    return [flag, *twins, *sorted({word_hash(w) for w in words})], vocab


class Vocabulary:
    """The words one process knows to be committed in one database's
    ``search_vocab``: a delivery sends only the others (which its statement
    inserts unless present). A word is remembered only after the
    transaction that inserted or found it committed; forgetting is always
    safe (the statement checks again), so the set is simply emptied when
    it grows past ``limit``."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.limit = limit
        self._known: set[bytes] = set()

    def unknown(self, words: set[bytes]) -> list[bytes]:
        """``words`` not known to be committed, sorted."""
        return sorted(words - self._known)

    def committed(self, words: list[bytes]) -> None:
        if len(self._known) + len(words) > self.limit:
            self._known.clear()
        self._known.update(words)


def search_params(values: dict[str, Any], vocab: Vocabulary) -> tuple[dict[str, Any], list[bytes]]:
    """The parameters the PostgreSQL message insert takes besides the row's
    columns (``search_words``, ``new_words``, ``new_hashes``), and the new
    words to pass to :meth:`Vocabulary.committed` once it committed."""
    hashes, words = message_index(values)
    new = vocab.unknown(words)
    return {
        "search_words": hashes,
        "new_words": [w.decode("ascii") for w in new],
        "new_hashes": [word_hash(w) for w in new],
    }, new


# One batch of index_unindexed: rows read, words hashed and written back.
UNINDEXED_BATCH = 500
_UNINDEXED = (
    "SELECT id, subject, from_text, to_text, cc_text, body_text FROM messages "
    "WHERE search_words IS NULL ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
)


def untagged_predicate() -> str:
    """SQL true of a row indexed before schema step 38 (no READY or TAGGED
    flag first): the predicate of its partial index
    ``messages_search_untagged``, which a query must spell the same way
    for the planner to use the index."""
    return f"search_words[1] NOT IN ({word_hash(READY)}, {word_hash(TAGGED)})"


# Rows indexed before step 38, indexed again (after the NULL ones).
_UNTAGGED = (
    "SELECT id, subject, from_text, to_text, cc_text, body_text FROM messages "
    f"WHERE {untagged_predicate()} ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
)
ADD_VOCAB_SQL = (
    "INSERT INTO search_vocab (word, hash) SELECT u.w, u.h "
    "FROM unnest(CAST(:new_words AS text[]), CAST(:new_hashes AS int4[])) AS u(w, h) "
    "WHERE NOT EXISTS (SELECT 1 FROM search_vocab s WHERE s.word = u.w)"
)
_SET_WORDS = (
    "UPDATE messages SET search_words = u.words FROM ("
    "SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(id bigint, words int4[])"
    ") AS u WHERE messages.id = u.id"
)


async def index_unindexed(conn: Any, batch: int = UNINDEXED_BATCH) -> int:
    """PostgreSQL: fills ``search_words`` (and the vocabulary) of up to
    ``batch`` rows that lack them, then of rows indexed before schema step
    38 (:func:`message_index`'s tags missing), in the caller's transaction
    (an ``AsyncConnection``); returns how many. Rows another session is
    filling are skipped, not waited for."""
    from sqlalchemy import text

    rows = (await conn.execute(text(_UNINDEXED), {"n": batch})).all()
    if len(rows) < batch:
        rows += (await conn.execute(text(_UNTAGGED), {"n": batch - len(rows)})).all()
    if not rows:
        return 0
    vocab: set[bytes] = set()
    out = []
    for row in rows:
        # Up to 1 MB of text a row (MAX_BODY_TEXT), some 40 ms of words:
        # the event loop's other sessions get their turn between rows.
        await asyncio.sleep(0)
        hashes, words = message_index(row._mapping)
        vocab |= words
        out.append({"id": row.id, "words": hashes})
    new = sorted(vocab)
    await conn.execute(
        text(ADD_VOCAB_SQL),
        {"new_words": [w.decode("ascii") for w in new], "new_hashes": [word_hash(w) for w in new]},
    )
    await conn.execute(text(_SET_WORDS), {"rows": json.dumps(out)})
    return len(rows)
