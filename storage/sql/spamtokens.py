"""The built-in anti-spam engine's per-account Bayes counts in a shard
database (tables ``spam_tokens`` and ``spam_learned``, schema v26).

Two operations, one body each for SQLite and PostgreSQL (the dialect's
upsert is the only difference, :func:`_upsert`):

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

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, case, select
from sqlalchemy.dialects import postgresql, sqlite

from storage.model import SpamCounts
from storage.sql.schema import spam_learned, spam_tokens

TOTALS = 0  # the token whose row holds the learned message totals
MAX_TOKENS = 5000  # tokens per call: bound parameters stay well under every driver's limit

T = spam_tokens


def _checked(tokens: Sequence[int]) -> list[int]:
    if len(tokens) > MAX_TOKENS:
        raise ValueError(f"{len(tokens)} tokens: at most {MAX_TOKENS} a message")
    return sorted({t for t in tokens if t != TOTALS})


def read_counts(conn: Connection, account_id: int, tokens: Sequence[int]) -> SpamCounts:
    """The account's counts for ``tokens`` (one SELECT)."""
    wanted = [TOTALS, *_checked(tokens)]
    rows = conn.execute(
        select(T.c.token, T.c.spam, T.c.ham).where(
            T.c.account_id == account_id, T.c.token.in_(wanted)
        )
    ).all()
    found = {int(r.token): (max(int(r.spam), 0), max(int(r.ham), 0)) for r in rows}
    spam, ham = found.pop(TOTALS, (0, 0))
    return SpamCounts(spam, ham, found)


def _upsert(conn: Connection, table: Any) -> Any:
    """The dialect's INSERT ... ON CONFLICT (both speak it; SQLAlchemy has
    one constructor per dialect)."""
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


def learn(
    conn: Connection, account_id: int, blob_key: str, tokens: Sequence[int], spam: bool
) -> bool:
    """Teaches the account ``tokens`` of the message ``blob_key`` as spam
    (or ham); False when it had already learned it so (module docstring)."""
    prior = conn.execute(
        select(spam_learned.c.spam).where(
            spam_learned.c.account_id == account_id, spam_learned.c.blob_key == blob_key
        )
    ).scalar_one_or_none()
    if prior is not None and bool(prior) == spam:
        return False
    undo = prior is not None  # the other class was learned: take it back
    spam_delta = (1 if spam else 0) - (1 if undo and not spam else 0)
    ham_delta = (0 if spam else 1) - (1 if undo and spam else 0)
    ins = _upsert(conn, T)
    upsert = ins.on_conflict_do_update(
        index_elements=[T.c.account_id, T.c.token],
        set_={
            "spam": case((T.c.spam + ins.excluded.spam < 0, 0), else_=T.c.spam + ins.excluded.spam),
            "ham": case((T.c.ham + ins.excluded.ham < 0, 0), else_=T.c.ham + ins.excluded.ham),
        },
    )
    # The deltas as inserted are what a conflicting row adds (``excluded``):
    # an undo's -1 must reach it, so they are not clamped here. Under the
    # account's lock the undone tokens' rows exist (the same blob gives the
    # same tokens); read_counts reads any stray negative count as 0.
    rows = [
        {"account_id": account_id, "token": token, "spam": spam_delta, "ham": ham_delta}
        for token in [TOTALS, *_checked(tokens)]
    ]
    conn.execute(upsert, rows)
    learned = _upsert(conn, spam_learned)
    conn.execute(
        learned.on_conflict_do_update(
            index_elements=[spam_learned.c.account_id, spam_learned.c.blob_key],
            set_={"spam": learned.excluded.spam},
        ),
        {"account_id": account_id, "blob_key": blob_key, "spam": spam},
    )
    return True


__all__ = ["MAX_TOKENS", "TOTALS", "learn", "read_counts"]
