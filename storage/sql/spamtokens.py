"""The built-in anti-spam engine's per-account Bayes counts in a shard
database (tables ``spam_tokens`` and ``spam_learned``, schema v26).

Two operations, one body each for SQLite and PostgreSQL (the differences
are details: how a list of tokens is passed, :data:`_READ`, and the
dialect's upsert constructor, :func:`_upsert`):

* :func:`read_counts`: the totals and the asked tokens' counts, in one
  statement (the totals are token 0's row, schema.py).
* :func:`learn`: one message's tokens taught as spam or ham, in the
  caller's write transaction, which has locked the account's row first
  (so two learns of one account never interleave). The message is named
  by its blob key: learned again as the same class it changes nothing;
  learned as the other class (moved back out of Junk, or back in) its
  earlier lesson is taken back first. Counts never go below zero.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, case, literal_column, select
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import postgresql, sqlite

from storage.model import SpamCounts
from storage.sql.db import execute
from storage.sql.schema import spam_learned, spam_tokens

TOTALS = 0  # the token whose row holds the learned message totals
MAX_TOKENS = 5000  # tokens per call: bound parameters stay well under every driver's limit

T = spam_tokens


def _checked(tokens: Sequence[int]) -> list[int]:
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"{len(tokens)} tokens: at most {MAX_TOKENS} a message")
    return sorted({t for t in tokens if t != TOTALS})


# One statement per dialect, compiled once (``db.execute``'s fast path): the
# tokens travel as one parameter, a JSON array that SQLite's json_each
# reads, a bigint[] for PostgreSQL, so the statement does not change with
# their number.
_READ = {
    "sqlite": sql_text(
        "SELECT token, spam, ham FROM spam_tokens WHERE account_id = :b_account"
        " AND token IN (SELECT value FROM json_each(:b_tokens))"
    ),
    "postgresql": sql_text(
        "SELECT token, spam, ham FROM spam_tokens WHERE account_id = :b_account"
        " AND token = ANY(CAST(:b_tokens AS BIGINT[]))"
    ),
}


def _token_list(conn: Connection, tokens: list[int]) -> object:
    return tokens if conn.dialect.name == "postgresql" else json.dumps(tokens)


def read_counts(conn: Connection, account_id: int, tokens: Sequence[int]) -> SpamCounts:
    """The account's counts for ``tokens`` (one SELECT)."""
    wanted = [TOTALS, *_checked(tokens)]
    params = {"b_account": account_id, "b_tokens": _token_list(conn, wanted)}
    rows = execute(conn, _READ[conn.dialect.name], params).all()
    found = {int(r.token): (max(int(r.spam), 0), max(int(r.ham), 0)) for r in rows}
    spam, ham = found.pop(TOTALS, (0, 0))
    return SpamCounts(spam, ham, found)


def _upsert(dialect: Any) -> Any:
    """Adds a row's counts to the stored ones, clamped at 0, or stores them:
    INSERT ... ON CONFLICT, which both speak (SQLAlchemy has one
    constructor per dialect)."""
    ins = dialect.insert(T)
    zero = literal_column("0")  # no bound parameter: db.execute passes the rows' own alone

    def added(column: str) -> Any:
        total = T.c[column] + ins.excluded[column]
        return case((total < zero, zero), else_=total)

    return ins.on_conflict_do_update(
        index_elements=[T.c.account_id, T.c.token],
        set_={"spam": added("spam"), "ham": added("ham")},
    )


def _remember(dialect: Any) -> Any:
    ins = dialect.insert(spam_learned)
    return ins.on_conflict_do_update(
        index_elements=[spam_learned.c.account_id, spam_learned.c.blob_key],
        set_={"spam": ins.excluded.spam},
    )


_UPSERT = {"sqlite": _upsert(sqlite), "postgresql": _upsert(postgresql)}
_REMEMBER = {"sqlite": _remember(sqlite), "postgresql": _remember(postgresql)}
_PRIOR = select(spam_learned.c.spam).where(
    spam_learned.c.account_id == bindparam("b_account"),
    spam_learned.c.blob_key == bindparam("b_key"),
)


def learn(
    conn: Connection, account_id: int, blob_key: str, tokens: Sequence[int], spam: bool
) -> bool:
    """Teaches the account ``tokens`` of the message ``blob_key`` as spam
    (or ham); False when it had already learned it so (module docstring)."""
    prior = execute(conn, _PRIOR, {"b_account": account_id, "b_key": blob_key}).scalar()
    if prior is not None and bool(prior) == spam:
        return False
    undo = prior is not None  # the other class was learned: take it back
    spam_delta = (1 if spam else 0) - (1 if undo and not spam else 0)
    ham_delta = (0 if spam else 1) - (1 if undo and spam else 0)
    # The deltas as inserted are what a conflicting row adds (``excluded``):
    # an undo's -1 must reach it, so they are not clamped here. Under the
    # account's lock the undone tokens' rows exist (the same blob gives the
    # same tokens); read_counts reads any stray negative count as 0.
    rows = [
        {"account_id": account_id, "token": token, "spam": spam_delta, "ham": ham_delta}
        for token in [TOTALS, *_checked(tokens)]
    ]
    execute(conn, _UPSERT[conn.dialect.name], rows)
    remembered = {"account_id": account_id, "blob_key": blob_key, "spam": spam}
    execute(conn, _REMEMBER[conn.dialect.name], remembered)
    return True


__all__ = ["MAX_TOKENS", "TOTALS", "learn", "read_counts"]
