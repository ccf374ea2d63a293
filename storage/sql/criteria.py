"""Evaluating a :mod:`storage.search` criteria tree against the SQL schema.

Two evaluators that agree: :func:`to_sql` turns a criterion into an exact SQL
condition where SQL can decide it exactly (flags, UIDs, sizes, day
comparisons, ASCII substrings of the indexed text columns), and
:func:`matches` decides any criterion in Python over a fetched
:class:`Candidate`. A tree that SQL cannot decide whole is narrowed by the
:func:`superset` condition and finished by :func:`matches`.

RFC 3501 section 6.4.4: string matches are case-insensitive substrings;
dates compare by calendar day, ignoring time and timezone.
"""

from __future__ import annotations

import bisect
import datetime as dt
import email.header
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    column,
    false,
    func,
    literal_column,
    not_,
    or_,
    select,
    table,
    true,
)
from sqlalchemy.sql.elements import ColumnClause

from storage.model import SYSTEM_FLAGS, UidSet
from storage.search import (
    All,
    And,
    Criteria,
    Date,
    Flag,
    Header,
    ModSeq,
    Not,
    Or,
    Size,
    Text,
    Uids,
)
from storage.sql import fts
from storage.sql.schema import SUBJECT_FTS
from storage.sql.schema import mailbox_entries as E
from storage.sql.schema import messages as M

# Bit of each system flag in mailbox_entries.sysflags.
FLAG_BITS: dict[str, int] = {flag: 1 << i for i, flag in enumerate(SYSTEM_FLAGS)}
_FLAG_BY_FOLDED = {flag.casefold(): flag for flag in SYSTEM_FLAGS}

# Header fields whose decoded text is a column (the others are read from the blob).
HEADER_COLUMNS: dict[str, Any] = {
    "subject": M.c.subject,
    "from": M.c.from_text,
    "to": M.c.to_text,
    "cc": M.c.cc_text,
}

# Beyond this many UID ranges an OR of ranges gets unwieldy for the SQL parser.
MAX_SQL_UID_RANGES = 200


def system_flag(flag: str) -> str | None:
    """The canonical spelling of a system flag, None for a keyword."""
    return _FLAG_BY_FOLDED.get(flag.casefold())


def like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def keyword_condition(keyword: str) -> ColumnElement[bool]:
    # keywords is stored " kw1 kw2 "; keywords are ASCII atoms (RFC 3501 section 9).
    return func.lower(E.c.keywords).like(f"% {like_escape(keyword.lower())} %", escape="\\")


def uid_condition(
    col: ColumnClause[Any] | Any, uids: UidSet, max_uid: int | None
) -> ColumnElement[bool] | None:
    """Exact SQL for membership in ``uids``; None when there are too many ranges.

    ``n:*`` covers the highest UID even when ``n`` exceeds it (RFC 3501
    section 9, seq-range).
    """
    if len(uids.ranges) > MAX_SQL_UID_RANGES:
        return None
    singles: list[int] = []
    parts: list[ColumnElement[bool]] = []
    for first, last in uids.ranges:
        if last is None:
            lo = first if max_uid is None else min(first, max_uid)
            parts.append(col >= lo)
        elif first == last:
            singles.append(first)
        else:
            parts.append(col.between(first, last))
    if singles:
        parts.append(col.in_(singles))
    if not parts:
        return false()
    return or_(*parts) if len(parts) > 1 else parts[0]


class UidMatcher:
    """Fast membership in a UidSet with ``*`` resolved against ``max_uid``."""

    def __init__(self, uids: UidSet, max_uid: int | None) -> None:
        self._starts: list[int] = []
        self._ends: list[float] = []
        for first, last in uids.ranges:
            if last is None:
                lo = first if max_uid is None else min(first, max_uid)
                self._starts.append(lo)
                self._ends.append(float("inf"))
            else:
                self._starts.append(first)
                self._ends.append(last)
        order = sorted(range(len(self._starts)), key=self._starts.__getitem__)
        self._starts = [self._starts[i] for i in order]
        self._ends = [self._ends[i] for i in order]
        # Running maximum of ends, so one bisect answers for overlapping ranges.
        running = float("-inf")
        self._reach: list[float] = []
        for end in self._ends:
            running = max(running, end)
            self._reach.append(running)

    def __contains__(self, uid: int) -> bool:
        i = bisect.bisect_right(self._starts, uid) - 1
        return i >= 0 and self._reach[i] >= uid

    def bounds(self) -> tuple[int, float] | None:
        if not self._starts:
            return None
        return self._starts[0], self._reach[-1]


@dataclass
class Context:
    """What evaluation needs beyond the tree: the mailbox's highest UID and
    which index narrows substring searches: SQLite's FTS5 trigram file
    (``sqlite_fts``) or PostgreSQL's word index and the subject's pg_trgm
    index (``pg_trgm``)."""

    max_uid: int | None
    sqlite_fts: bool = False
    pg_trgm: bool = False
    # False: text conditions are the exact comparison alone, for rows an
    # index already picked (:func:`index_superset`, then :func:`to_sql`).
    use_index: bool = True

    @classmethod
    def for_backend(cls, is_sqlite: bool, max_uid: int | None = None) -> Context:
        return cls(max_uid=max_uid, sqlite_fts=is_sqlite, pg_trgm=not is_sqlite)


# SQLite's trigram index (a file of its own, attached to reader connections
# as ``fts``) and the queue of messages not indexed yet (storage/sql/fts.py).
_FTS = table("messages_fts", column("rowid"), schema="fts")
_FTS_QUEUE = table("fts_pending", column("message_id"))
FTS_MIN_LENGTH = 3  # the trigram index cannot answer shorter substrings
# PostgreSQL's word index (schema step 20, storage/sql/fts.py).
_PG_SEARCH_WORDS = literal_column("messages.search_words")
_PG_VOCAB = table("search_vocab", column("word"), column("hash"))
# SQLite's subject-only trigram table (schema step 19), in the main database.
_SUBJECT_FTS = table(SUBJECT_FTS, column("rowid"))


# The columns a Text("content") search looks in.
CONTENT_COLUMNS = (M.c.subject, M.c.from_text, M.c.to_text, M.c.cc_text, M.c.body_text)


def _text_condition(cols: Sequence[Any], value: str, ctx: Context) -> ColumnElement[bool]:
    """Case-insensitive substring of any of ``cols``, narrowed first by the
    index (:func:`_index_condition`) unless ``ctx.use_index`` is off. On
    PostgreSQL a body or content search first asks the row's word hashes
    (:func:`pg_sure_condition`), which spares most matches the read of
    their text; the exact test decides the others."""
    exact = [contains_condition(col, value, ctx) for col in cols]
    narrow = _index_condition(cols, value, ctx) if ctx.use_index else None
    if ctx.pg_trgm and (list(cols) == [M.c.body_text] or tuple(cols) == CONTENT_COLUMNS):
        sure = pg_sure_condition(value, body_only=len(cols) == 1, narrowed=narrow is not None)
        if sure is not None:
            exact.insert(0, sure)  # OR evaluates left to right: the text last
    cond = or_(*exact) if len(exact) > 1 else exact[0]
    return cond if narrow is None else and_(narrow, cond)


def _index_condition(cols: Sequence[Any], value: str, ctx: Context) -> ColumnElement[bool] | None:
    """A superset of the rows holding the ASCII ``value`` in one of ``cols``
    that an index answers without reading the text columns (None: no index
    narrows this value). On SQLite the trigram index's matches plus the
    messages still queued for it, as entries' message ids (so listing
    candidates reads no ``messages`` row); on PostgreSQL the word index."""
    subject_only = len(cols) == 1 and cols[0] is M.c.subject
    if subject_only and (ctx.sqlite_fts or ctx.pg_trgm) and len(value) >= FTS_MIN_LENGTH:
        return _subject_candidates(value, ctx)
    if ctx.sqlite_fts and len(value) >= FTS_MIN_LENGTH:
        # Any column: detail=none keeps no column either; the exact
        # condition decides among the rows the index returns. One IN over
        # a UNION (not an OR of two INs) lets SQLite drive the query from
        # the index's few rows by primary key instead of scanning the mailbox.
        query = fts_trigram_query(value)
        hits = select(_FTS.c.rowid).where(literal_column("messages_fts").op("MATCH")(query))
        queued = select(_FTS_QUEUE.c.message_id)
        return E.c.message_id.in_(hits.union_all(queued))
    if ctx.pg_trgm:
        return pg_word_candidates(value)
    return None


def contains_condition(col: Any, value: str, ctx: Context) -> ColumnElement[bool]:
    """``col`` holds the ASCII ``value``, case-insensitively (RFC 3501
    section 6.4.4), as ``lower(col) LIKE lower(value)`` decides it.

    SQLite: a plain LIKE, which folds ASCII letters itself (SQLite's lower()
    folds only those too, so ``lower()`` around it would only copy every
    body first).

    PostgreSQL: ILIKE lowercases the whole text through the locale first,
    about two thirds of what comparing a body costs. A case-insensitive
    regular expression of the value as a literal string (the ``***=``
    director, PostgreSQL manual 9.7.3.4) folds only the value's own letters
    and scans the text as it is. It finds a subset of what ILIKE finds (a
    letter matches itself and its other case only; ILIKE also takes the
    Kelvin sign for ``k``, a character whose lowercase is ASCII): so ILIKE
    still decides for a text holding any non-ASCII character, and a text
    of ASCII alone is decided by the expression."""
    if ctx.sqlite_fts:
        return col.like(f"%{like_escape(value)}%", escape="\\")
    ilike = col.icontains(value, autoescape=True)
    literal_regex = col.op("~*")("***=" + value)
    return or_(literal_regex, and_(func.octet_length(col) != func.char_length(col), ilike))


def pg_word_candidates(value: str) -> ColumnElement[bool] | None:
    """PostgreSQL: a superset of the messages holding the ASCII ``value``
    in any searched column, from the word index (schema step 20), or None
    when no word of ``value`` is long enough to narrow (a scan then).

    Each word of ``value`` lies inside one word of every message holding
    it (the contract in storage/sql/fts.py), so: for each, the messages
    carrying the hash of a vocabulary word that contains it (trigram LIKE
    on the vocabulary; the array is computed once per query), ANDed; plus
    the rows not indexed yet. The exact test decides."""
    words = sorted(fts.words_of(value))
    if not words:
        return None
    parts = []
    long_word = fts.word_hash(fts.LONG_WORD)
    for word in words:
        # The hashes of the vocabulary words holding ``word``, and the
        # marker of rows with a word too long for the vocabulary (which may
        # hold it too; a longer ``word`` only lies in such a row).
        hashes = select(
            func.array_append(func.array_agg(_PG_VOCAB.c.hash), long_word)
        ).where(_PG_VOCAB.c.word.like(f"%{word.decode('ascii')}%"))
        parts.append(_PG_SEARCH_WORDS.op("&&")(hashes.scalar_subquery()))
    return or_(and_(*parts), _PG_SEARCH_WORDS.is_(None))


def pg_sure_condition(
    value: str, body_only: bool, narrowed: bool
) -> ColumnElement[bool] | None:
    """PostgreSQL: a condition on a ``messages`` row's word hashes alone
    that implies the exact test (:func:`contains_condition`) of the ASCII
    ``value`` in its body (``body_only``) or in any searched column, never
    NULL; None when ``value`` is not one vocabulary-length word (letters
    and digits only), where no such shortcut holds. ``narrowed``: the
    query also requires :func:`pg_word_candidates` of ``value``.

    Why it is exact (the contract and the array's layout in
    storage/sql/fts.py, schema steps 20 and 38): ``search_vocab`` holds
    every word of every committed row in the same snapshot (a row's words
    are inserted in its transaction, and never removed). Let S be the
    hashes h of vocabulary words holding ``value`` such that every
    vocabulary word hashed h holds it too, h is no marker's, and, for a
    content search, every word whose tagged twin is h holds it as well
    (for the body, no word's twin is h). A
    READY row (its first element; no vocabulary word is hashed READY, which
    a row indexed before step 38 could hold first) carrying a hash of S has
    a word holding ``value`` in its text: ASCII letters and digits there
    (READY: no character whose lowercase makes ASCII letters), so the text
    holds ``value`` case-insensitively, as ``~*`` folds ASCII in every
    locale. For the body only, the row must also lack the tagged twins of
    S among its first TWIN_SLOTS elements, where a READY row keeps all its
    twins: a hash without its twin comes from a body word. When every
    vocabulary word holding ``value`` is in S (and no word nor twin is
    hashed as LONG_WORD), a READY row the word index selected
    (``narrowed``) carries one: no need to look. A row that fails
    any of this goes to the exact test, so only the cost of a search
    changes, never its answer."""
    lowered = value.lower()
    if not (
        lowered.isascii()
        and lowered.isalnum()
        and fts.VOCAB_MIN_LENGTH <= len(lowered) <= fts.VOCAB_MAX_LENGTH
    ):
        return None
    pattern = f"%{lowered}%"
    ready = fts.word_hash(fts.READY)
    v = _PG_VOCAB.alias("v")
    other = _PG_VOCAB.alias("u")
    same = other.c.hash == v.c.hash
    twin = other.c.hash == v.c.hash.op("#")(fts.HEADER_TAG)
    if body_only:
        # A header word whose twin is h never counts for the body.
        clashes = [
            ~select(other.c.hash).where(same, other.c.word.not_like(pattern)).exists(),
            ~select(other.c.hash).where(twin).exists(),
        ]
    else:
        clashes = [
            ~select(other.c.hash).where(or_(same, twin), other.c.word.not_like(pattern)).exists()
        ]
    is_sure = and_(v.c.hash.not_in(fts.marker_hashes()), *clashes)
    holding = select(v.c.hash).where(
        v.c.word.like(pattern),
        ~select(_PG_VOCAB.c.hash).where(_PG_VOCAB.c.hash == ready).exists(),
    )
    # NULL (array_agg of nothing) when no hash is sure: so is the whole
    # condition, coalesced to false below.
    sure = holding.with_only_columns(func.array_agg(v.c.hash)).where(is_sure)
    words = _PG_SEARCH_WORDS
    parts = [literal_column("messages.search_words[1]") == ready]
    if body_only:
        twins = sure.with_only_columns(func.array_agg(v.c.hash.op("#")(fts.HEADER_TAG)))
        head = literal_column(f"messages.search_words[1:{fts.TWIN_SLOTS}]")
        parts.append(~head.op("&&")(twins.scalar_subquery()))
    carries = words.op("&&")(sure.scalar_subquery())
    if narrowed:
        # The candidates' condition also takes LONG_WORD's hash: it must be
        # no word's (nor twin's) for a candidate to carry a hash of S.
        long_word = fts.word_hash(fts.LONG_WORD)
        no_long = ~select(_PG_VOCAB.c.hash).where(
            _PG_VOCAB.c.hash.in_([long_word, fts.header_hash(long_word)])
        ).exists()
        every = holding.with_only_columns(func.bool_and(is_sure)).where(no_long)
        carries = or_(every.scalar_subquery(), carries)
    parts.append(carries)
    return func.coalesce(and_(*parts), false())


def _subject_candidates(value: str, ctx: Context) -> ColumnElement[bool]:
    """SUBJECT ``value`` (3 characters or more): a superset of the messages
    whose subject holds it, answered by the subject-only trigram index of
    schema step 19, so a word common in bodies but rare in subjects costs
    the few subjects holding its trigrams. The exact test decides."""
    if ctx.sqlite_fts:
        # Kept in step by triggers: no queue of unindexed messages to add.
        query = fts_trigram_query(value)
        hits = select(_SUBJECT_FTS.c.rowid).where(literal_column(SUBJECT_FTS).op("MATCH")(query))
        return E.c.message_id.in_(hits)
    # The index's own expression (the column), which is how the planner
    # matches it; ILIKE is what pg_trgm's operator class answers.
    return M.c.subject.ilike(f"%{like_escape(value)}%", escape="\\")


# Trigrams one FTS5 query ANDs at most: each costs one read of its row
# list, and past a dozen a value's rows are as few as they get.
MAX_QUERY_TRIGRAMS = 16


def fts_trigram_query(value: str) -> str:
    """An FTS5 query matching every row whose text holds all the trigrams
    of ``value`` (len >= 3): a superset of the rows containing it.

    The index keeps no positions nor columns (``detail=none``), so no
    phrase and no column filter: an AND of single trigrams. Every distinct
    trigram of ``value`` (up to MAX_QUERY_TRIGRAMS, spread over it): a row
    holding ``abc`` and ``def`` but not ``bcd`` cannot hold ``abcdef``, and
    with the trigrams in between far fewer rows reach the exact test (a
    cover alone let through three to four times the matches for a word of
    common letters). Any subset of the trigrams still selects a superset.
    Each is a quoted string (``"`` doubled), so no character of it is
    query syntax.
    """
    trigrams = list(dict.fromkeys(value[i : i + 3] for i in range(len(value) - 2)))
    if len(trigrams) > MAX_QUERY_TRIGRAMS:
        step = (len(trigrams) - 1) / (MAX_QUERY_TRIGRAMS - 1)
        trigrams = [trigrams[round(k * step)] for k in range(MAX_QUERY_TRIGRAMS)]
    return " AND ".join('"{}"'.format(t.replace('"', '""')) for t in trigrams)


# RFC 8514 save dates are kept in UTC (mailbox_entries.saved_at, epoch
# microseconds): a day is a range of them.
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_DAY_MICROS = 86_400_000_000


def day_start_micros(day: dt.date) -> int:
    """The first epoch microsecond of ``day`` in UTC."""
    return (day.toordinal() - _EPOCH_ORDINAL) * _DAY_MICROS


def _day_condition(c: Date) -> ColumnElement[bool]:
    if c.field == "saved":
        # RFC 8514 section 4: the save date's day; older entries' is their
        # internal date (see mailbox_entries.saved_at).
        saved = func.coalesce(E.c.saved_at, E.c.internal_date)
        start = day_start_micros(c.date)
        if c.op == "before":
            return saved < start
        if c.op == "on":
            return and_(saved >= start, saved < start + _DAY_MICROS)
        return saved >= start
    col = (
        E.c.internal_day if c.field == "internal" else func.coalesce(M.c.sent_day, E.c.internal_day)
    )
    day = c.date.toordinal()
    if c.op == "before":
        return col < day
    if c.op == "on":
        return col == day
    return col >= day


def to_sql(c: Criteria, ctx: Context) -> ColumnElement[bool] | None:
    """An exact SQL condition for ``c``, or None if SQL cannot decide it exactly."""
    if isinstance(c, All):
        return true()
    if isinstance(c, Flag):
        sysflag = system_flag(c.flag)
        if sysflag is not None:
            cond = E.c.sysflags.op("&")(FLAG_BITS[sysflag]) != 0
        else:
            cond = keyword_condition(c.flag)
        return cond if c.present else not_(cond)
    if isinstance(c, Header):
        col = HEADER_COLUMNS.get(c.name.lower())
        if col is None or not c.value or not c.value.isascii():
            return None
        return _text_condition((col,), c.value, ctx)
    if isinstance(c, Text):
        if not c.value:
            return true()
        if c.where == "text" or not c.value.isascii():
            return None
        cols = (M.c.body_text,) if c.where == "body" else CONTENT_COLUMNS
        return _text_condition(cols, c.value, ctx)
    if isinstance(c, Date):
        return _day_condition(c)
    if isinstance(c, Size):
        return E.c.size > c.octets if c.op == "larger" else E.c.size < c.octets
    if isinstance(c, Uids):
        return uid_condition(E.c.uid, c.uids, ctx.max_uid)
    if isinstance(c, ModSeq):
        return E.c.modseq >= c.modseq
    if isinstance(c, Not):
        inner = to_sql(c.term, ctx)
        return None if inner is None else not_(inner)
    if isinstance(c, Or):
        left, right = to_sql(c.left, ctx), to_sql(c.right, ctx)
        return None if left is None or right is None else or_(left, right)
    if isinstance(c, And):
        parts = [to_sql(t, ctx) for t in c.terms]
        if any(p is None for p in parts):
            return None
        return and_(true(), *parts)  # type: ignore[arg-type]
    raise TypeError(f"unknown search criterion {c!r}")


def superset(c: Criteria, ctx: Context) -> ColumnElement[bool] | None:
    """A SQL condition every match satisfies (None: no narrowing possible)."""
    exact = to_sql(c, ctx)
    if exact is not None:
        return exact
    if isinstance(c, And):
        parts = [p for p in (superset(t, ctx) for t in c.terms) if p is not None]
        return and_(*parts) if parts else None
    if isinstance(c, Or):
        left, right = superset(c.left, ctx), superset(c.right, ctx)
        return None if left is None or right is None else or_(left, right)
    if isinstance(c, Uids):
        bounds = UidMatcher(c.uids, ctx.max_uid).bounds()
        if bounds is None:
            return false()
        lo, hi = bounds
        return E.c.uid >= lo if hi == float("inf") else E.c.uid.between(lo, int(hi))
    return None


def index_superset(c: Criteria, ctx: Context) -> ColumnElement[bool] | None:
    """A SQL condition every match of ``c`` satisfies that reads no text
    column of ``messages`` (flags, dates, sizes, UIDs and the full-text
    indexes' candidates), or None unless a full-text index narrows ``c``.

    The first step of a search that stops early (``search_account``): the
    candidates it selects are cheap to list and order; the exact test, which
    reads each message's text, then runs only on as many as a page needs.
    """
    cond, narrowed = _index_superset(c, ctx)
    return cond if narrowed else None


def _index_superset(c: Criteria, ctx: Context) -> tuple[ColumnElement[bool] | None, bool]:
    """(condition or None for "any row", whether an index narrowed it)."""
    if isinstance(c, Header | Text):
        if isinstance(c, Header):
            col = HEADER_COLUMNS.get(c.name.lower())
            cols: Sequence[Any] | None = None if col is None else (col,)
        else:
            cols = (M.c.body_text,) if c.where == "body" else CONTENT_COLUMNS
            cols = None if c.where == "text" else cols
        if cols is None or not c.value or not c.value.isascii():
            return None, False
        narrow = _index_condition(cols, c.value, ctx)
        return narrow, narrow is not None
    if isinstance(c, And):
        found = [_index_superset(t, ctx) for t in c.terms]
        parts = [p for p, _ in found if p is not None]
        return (and_(*parts) if parts else None), any(n for _, n in found)
    if isinstance(c, Or):
        (left, ln), (right, rn) = _index_superset(c.left, ctx), _index_superset(c.right, ctx)
        if left is None or right is None:
            return None, False
        return or_(left, right), ln or rn
    if _reads_text(c):
        return None, False  # a Not over text: its complement has no index
    return to_sql(c, ctx), False


def _any_leaf(c: Criteria, test: Callable[[Criteria], bool]) -> bool:
    """True if ``test`` holds for a leaf of ``c`` (below its Not, Or, And)."""
    if isinstance(c, Not):
        return _any_leaf(c.term, test)
    if isinstance(c, Or):
        return _any_leaf(c.left, test) or _any_leaf(c.right, test)
    if isinstance(c, And):
        return any(_any_leaf(t, test) for t in c.terms)
    return test(c)


def _reads_text(c: Criteria) -> bool:
    return _any_leaf(c, lambda leaf: isinstance(leaf, Header | Text))


def _needs_header(leaf: Criteria) -> bool:
    if isinstance(leaf, Header):
        return leaf.name.lower() not in HEADER_COLUMNS or not leaf.value
    if isinstance(leaf, Text):
        return leaf.where == "text" and bool(leaf.value)
    return False


def needs_headers(c: Criteria) -> bool:
    """True if deciding ``c`` in Python needs the raw header of the message."""
    return _any_leaf(c, _needs_header)


@dataclass
class Candidate:
    """One mailbox entry with the fields Python evaluation reads."""

    uid: int
    sysflags: int
    keywords: str
    modseq: int
    size: int
    internal_day: int
    saved_at: int  # the save date, epoch microseconds UTC (internal date if unknown)
    sent_day: int | None
    subject: str
    from_text: str
    to_text: str
    cc_text: str
    body_text: str
    header: bytes | None = None  # the raw top-level header; None: not loaded yet
    _fields: dict[str, list[str]] | None = field(default=None, repr=False)

    def _raw_header(self) -> bytes:
        if self.header is None:
            raise NeedHeader
        return self.header

    def header_values(self, name: str) -> list[str]:
        """Unfolded values of the field ``name``, RFC 2047 encoded words decoded."""
        if self._fields is None:
            text = self._raw_header().decode("utf-8", errors="replace")
            self._fields = {}
            for line in _FOLD.sub("", text).splitlines():  # RFC 5322 section 2.2.3
                key, colon, value = line.partition(":")
                key = key.strip()
                if colon and key and " " not in key:
                    self._fields.setdefault(key.lower(), []).append(_decode_words(value.strip()))
        return self._fields.get(name.lower(), [])

    def header_text(self) -> str:
        """The raw header, unfolded (RFC 5322 section 2.2.3), for TEXT searches."""
        raw = self._raw_header().decode("utf-8", errors="replace")
        return raw.replace("\r\n", "\n").replace("\n ", " ").replace("\n\t", " ")


_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded (storage.mime's decoder when present)."""
    if "=?" not in value:
        return value
    try:
        from storage.mime import decode_words  # the ingest's decoder, if built
    except ImportError:
        try:
            return str(email.header.make_header(email.header.decode_header(value)))
        except Exception:
            return value
    try:
        return decode_words(value)
    except Exception:
        return value


class NeedHeader(Exception):
    """Raised by a Candidate whose header is needed but not loaded."""


def _contains(haystack: str, needle: str) -> bool:
    return needle.casefold() in haystack.casefold()


def matches(c: Criteria, m: Candidate, ctx: Context) -> bool:
    """Decides ``c`` for one candidate exactly (the reference semantics)."""
    if isinstance(c, All):
        return True
    if isinstance(c, Flag):
        sysflag = system_flag(c.flag)
        if sysflag is not None:
            has = bool(m.sysflags & FLAG_BITS[sysflag])
        else:
            has = c.flag.lower() in m.keywords.lower().split()
        return has == c.present
    if isinstance(c, Header):
        name = c.name.lower()
        if name in HEADER_COLUMNS and c.value:
            text = {"subject": m.subject, "from": m.from_text, "to": m.to_text, "cc": m.cc_text}
            return _contains(text[name], c.value)
        values = m.header_values(name)
        if not c.value:
            return bool(values)
        return any(_contains(v, c.value) for v in values)
    if isinstance(c, Text):
        if not c.value:
            return True
        if _contains(m.body_text, c.value):
            return True
        if c.where == "body":
            return False
        if any(_contains(t, c.value) for t in (m.subject, m.from_text, m.to_text, m.cc_text)):
            return True
        if c.where == "content":
            return False
        # Raw header text; the usual encoded-word fields were matched decoded above.
        return _contains(m.header_text(), c.value)
    if isinstance(c, Date) and c.field == "saved":
        start = day_start_micros(c.date)
        if c.op == "before":
            return m.saved_at < start
        if c.op == "on":
            return start <= m.saved_at < start + _DAY_MICROS
        return m.saved_at >= start
    if isinstance(c, Date):
        day = m.internal_day if c.field == "internal" else (m.sent_day or m.internal_day)
        target = c.date.toordinal()
        if c.op == "before":
            return day < target
        if c.op == "on":
            return day == target
        return day >= target
    if isinstance(c, Size):
        return m.size > c.octets if c.op == "larger" else m.size < c.octets
    if isinstance(c, Uids):
        return m.uid in UidMatcher(c.uids, ctx.max_uid)
    if isinstance(c, ModSeq):
        return m.modseq >= c.modseq
    if isinstance(c, Not):
        return not matches(c.term, m, ctx)
    if isinstance(c, Or):
        return matches(c.left, m, ctx) or matches(c.right, m, ctx)
    if isinstance(c, And):
        return all(matches(t, m, ctx) for t in c.terms)
    raise TypeError(f"unknown search criterion {c!r}")


def compile_matcher(c: Criteria, ctx: Context) -> Callable[[Candidate], bool]:
    """``matches`` with the UID sets pre-indexed (one bisect per entry)."""
    cache: dict[int, UidMatcher] = {}

    def walk(node: Criteria) -> None:
        if isinstance(node, Uids):
            cache[id(node)] = UidMatcher(node.uids, ctx.max_uid)
        elif isinstance(node, Not):
            walk(node.term)
        elif isinstance(node, Or):
            walk(node.left)
            walk(node.right)
        elif isinstance(node, And):
            for t in node.terms:
                walk(t)

    walk(c)

    def run(node: Criteria, m: Candidate) -> bool:
        if isinstance(node, Uids):
            return m.uid in cache[id(node)]
        if isinstance(node, Not):
            return not run(node.term, m)
        if isinstance(node, Or):
            return run(node.left, m) or run(node.right, m)
        if isinstance(node, And):
            return all(run(t, m) for t in node.terms)
        return matches(node, m, ctx)

    return lambda m: run(c, m)
