"""Per-account sender lists and Junk threshold in the mail shard (issue #22).

The rows live in the account's shard (``sender_lists``, ``spam_settings``,
schema step 24) beside its mailboxes: an account move copies them
(:func:`copy_spam_policy`), removing the account deletes them
(:func:`delete_spam_policy`). Writes take the account's lock like every
other write of the mail store (``SqlMailStore._write``), so a write during
a move's fence fails TEMPORARY instead of landing on the old shard. One
body per operation: nothing here differs between SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from sqlalchemy import (
    Connection,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    null,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from storage import errors
from storage.model import MAX_SPAM_ENTRIES, SPAM_THRESHOLD_LIMIT, SpamPolicy
from storage.sql.db import Database, execute
from storage.sql.schema import sender_lists, spam_settings

LISTS = ("allow", "block")
MAX_ENTRIES = MAX_SPAM_ENTRIES
MAX_ENTRY = 330  # characters: an address (RFC 5321 4.5.3.1.3: 256) or "*." and a domain
THRESHOLD_LIMIT = SPAM_THRESHOLD_LIMIT


class _Locked(Protocol):
    """What :class:`SpamPolicyStore` needs of the mail store it is mixed into."""

    db: Database

    def _write(self, account_id: int) -> AbstractAsyncContextManager[Any]: ...


def _check_entry(entry: str) -> None:
    if not isinstance(entry, str) or not entry or len(entry) > MAX_ENTRY:
        raise errors.invalid(f"a sender list entry is 1 to {MAX_ENTRY} characters")


def _check_threshold(value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or abs(value) > THRESHOLD_LIMIT):
        raise errors.invalid(
            f"the Junk threshold is a number from -{THRESHOLD_LIMIT:g} to {THRESHOLD_LIMIT:g}"
        )


# The account's entries and its threshold in one statement (a delivery
# reads this for every local recipient): run straight on the driver
# (``db.execute``), the threshold as a row of its own kind.
_POLICY = union_all(
    select(sender_lists.c.list, sender_lists.c.entry, null().label("junk_threshold")).where(
        sender_lists.c.account_id == bindparam("b_account")
    ),
    select(
        literal_column("'threshold'"), literal_column("''"), spam_settings.c.junk_threshold
    ).where(spam_settings.c.account_id == bindparam("b_account")),
)


def _read(conn: Connection, account_id: int, entries: Collection[str] | None) -> SpamPolicy:
    wanted = None if entries is None else set(entries)
    allow, block, threshold = [], [], None
    for kind, entry, value in execute(conn, _POLICY, {"b_account": account_id}).all():
        if kind == "threshold":
            threshold = None if value is None else float(value)
        elif wanted is None or entry in wanted:
            (allow if kind == "allow" else block).append(entry)
    return SpamPolicy(tuple(sorted(allow)), tuple(sorted(block)), threshold)


class SpamPolicyStore:
    """The mail store's spam policy operations (mixed into ``SqlMailStore``)."""

    async def spam_policy(
        self: _Locked, account_id: int, entries: Collection[str] | None = None
    ) -> SpamPolicy:
        """The account's lists and threshold; with ``entries``, only those of
        its list entries (what a delivery looks up: the few entries that
        could match a sender). One statement, one thread hop on SQLite."""
        return await self.db.read_sync(lambda conn: _read(conn, account_id, entries))

    async def set_sender_entry(
        self: _Locked, account_id: int, entry: str, to_list: str | None
    ) -> str | None:
        """Puts ``entry`` on the list ``to_list`` ("allow" or "block"),
        taking it off the other one, or takes it off both (None). Returns
        the list it was on before (None: none). INVALID for another list
        name, an empty or overlong entry, or a new entry past
        :data:`MAX_ENTRIES`. ``entry`` is stored as given: callers pass it
        normalised (``delivery.acctpolicy.parse_entry``)."""
        _check_entry(entry)
        if to_list is not None and to_list not in LISTS:
            raise errors.invalid(f"no sender list {to_list!r}: allow or block")
        async with self._write(account_id) as tx:
            conn: AsyncConnection = tx.conn
            mine = sender_lists.c.account_id == account_id
            was = (
                await conn.execute(
                    select(sender_lists.c.list).where(mine, sender_lists.c.entry == entry)
                )
            ).scalar()
            if was == to_list:
                return was
            if was is not None:
                await conn.execute(delete(sender_lists).where(mine, sender_lists.c.entry == entry))
            if to_list is not None:
                if was is None:
                    count = (
                        await conn.execute(
                            select(func.count()).select_from(sender_lists).where(mine)
                        )
                    ).scalar_one()
                    if count >= MAX_ENTRIES:
                        raise errors.invalid(f"at most {MAX_ENTRIES} sender list entries")
                await conn.execute(
                    insert(sender_lists).values(
                        account_id=account_id, entry=entry, list=to_list, created=time.time()
                    )
                )
            return was

    async def set_junk_threshold(self: _Locked, account_id: int, value: float | None) -> None:
        """The account's Junk threshold (None: the spam filter's own action)."""
        _check_threshold(value)
        async with self._write(account_id) as tx:
            await _put_threshold(tx.conn, account_id, value)

    async def put_spam_policy(self: _Locked, account_id: int, policy: SpamPolicy) -> None:
        """Replaces the account's lists and threshold with ``policy`` in one
        transaction. INVALID (nothing changed) for an entry on both lists or
        twice, an entry :meth:`set_sender_entry` would refuse, or more than
        :data:`MAX_ENTRIES` entries."""
        entries = [*policy.allow, *policy.block]
        for entry in entries:
            _check_entry(entry)
        if len(set(entries)) != len(entries):
            raise errors.invalid("an entry may be on one list, once")
        if len(entries) > MAX_ENTRIES:
            raise errors.invalid(f"at most {MAX_ENTRIES} sender list entries")
        _check_threshold(policy.junk_threshold)
        async with self._write(account_id) as tx:
            conn: AsyncConnection = tx.conn
            await conn.execute(delete(sender_lists).where(sender_lists.c.account_id == account_id))
            now = time.time()
            rows = [
                {"account_id": account_id, "entry": e, "list": kind, "created": now}
                for kind, listed in (("allow", policy.allow), ("block", policy.block))
                for e in listed
            ]
            if rows:
                await conn.execute(insert(sender_lists), rows)
            await _put_threshold(conn, account_id, policy.junk_threshold)


async def _put_threshold(conn: AsyncConnection, account_id: int, value: float | None) -> None:
    await conn.execute(delete(spam_settings).where(spam_settings.c.account_id == account_id))
    if value is not None:
        await conn.execute(
            insert(spam_settings).values(account_id=account_id, junk_threshold=value)
        )


async def delete_spam_policy(conn: AsyncConnection, account_id: int) -> None:
    """Removes the account's lists and threshold from this shard database."""
    await conn.execute(delete(sender_lists).where(sender_lists.c.account_id == account_id))
    await conn.execute(delete(spam_settings).where(spam_settings.c.account_id == account_id))


async def copy_spam_policy(
    source: AsyncConnection, target: AsyncConnection, account_id: int
) -> None:
    """The account's lists and threshold on ``target`` made those of
    ``source`` (an account move's round: whole, as subscriptions are)."""
    await delete_spam_policy(target, account_id)
    for table in (sender_lists, spam_settings):
        rows = (await source.execute(select(table).where(table.c.account_id == account_id))).all()
        if rows:
            await target.execute(insert(table), [dict(r._mapping) for r in rows])


__all__ = [
    "LISTS",
    "MAX_ENTRIES",
    "SpamPolicyStore",
    "copy_spam_policy",
    "delete_spam_policy",
]
