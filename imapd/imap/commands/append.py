"""APPEND (RFC 3501 section 6.3.11) with MULTIAPPEND (RFC 3502), APPENDUID
(RFC 4315 section 3), literal8 content (RFC 3516 section 4.4) and
CATENATE (RFC 4469, assembled by :mod:`imapd.imap.commands.catenate`).

MULTIAPPEND is atomic (RFC 3502 section 6.3.11: "either all messages are
successfully appended, or no messages are appended"): every message is
checked (present, non-empty, within the size limit) before any is stored,
so a bad message anywhere stores nothing; then all are committed in one
transaction (``storage.ingest.ingest_many``), so a failure while storing
(quota for their sum, the database) leaves the mailbox as it was.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

from delivery.spool import SpoolFile
from imapd.imap.commands.catenate import BadUrl, TooBig, assemble
from imapd.imap.namespace import in_other_users
from imapd.imap.session import Reply, Session, bad, no, ok
from imapd.imap.wire import encode
from imapd.imap.wire.commands import Append, Catenate
from storage.acl import flag_rights
from storage.errors import ErrorKind, StorageError
from storage.model import AppendResult

# One message of a MULTIAPPEND as ``ingest_many`` takes it: source, flags, date.
Staged = tuple[bytes | Path, tuple[str, ...], datetime | None]


def _source(message: object) -> tuple[bytes | Path, int] | None:
    if isinstance(message, SpoolFile):
        return message.path, message.size
    if isinstance(message, bytes):
        return message, len(message)
    return None


async def handle_append(s: Session, cmd: Append) -> Reply:
    from storage.ingest import Delivery, ingest, ingest_many

    assert s.mail is not None and s.account is not None
    try:
        access = await s.open_access(cmd.mailbox)
    except StorageError as err:
        if err.kind is ErrorKind.NOT_FOUND and not in_other_users(cmd.mailbox):
            # RFC 3501 section 6.3.11: TRYCREATE tells the client to CREATE first.
            return no("Mailbox does not exist", "TRYCREATE")
        raise
    access.require("i", "append to this mailbox")  # RFC 4314 section 4: APPEND needs "i"
    box = access.mailbox
    owner = access.owner
    items = [(cmd.flags, cmd.internal_date, cmd.message)]
    items += [(m.flags, m.internal_date, m.message) for m in cmd.more]
    sources: list[bytes | Path] = []
    for _, _, message in items:  # all checked before any is stored (RFC 3502)
        if isinstance(message, Catenate):
            # RFC 4469 section 5: assembled (all of a MULTIAPPEND) before any is stored.
            try:
                message = await assemble(s, message)
            except TooBig:
                return no("Message too large", "TOOBIG")
            except BadUrl as err:
                return no("CATENATE URL does not resolve", err.code)
        found = _source(message)
        if found is None:
            return bad("Bad message literal")
        source, size = found
        if size == 0:
            return no("Empty message", "CANNOT")
        if size > s.ctx.max_literal:
            return no("Message too large", "TOOBIG")
        sources.append(source)
    claim = owner.id == s.account.id and s.claims_recent_in(box.id)
    # RFC 4314 section 4: flags without the right to set them are dropped.
    kept = []
    for flags, _, _ in items:
        needs = flag_rights(flags)
        kept.append(tuple(f for f in flags if needs[f] in access.rights))
    results: list[AppendResult]
    if len(items) == 1:
        delivery = Delivery(owner, box.id, kept[0], items[0][1], claim_recent=claim)
        results = await ingest(s.storage, [delivery], sources[0])
    else:
        # RFC 3502 section 6.3.11: all or none. Each message is staged
        # (blob and row, in no mailbox), then one transaction gives them
        # their UIDs: a failure (quota for their sum, the database) leaves
        # the mailbox as it was, not even a UID taken, nothing for another
        # session to see come and go.
        async def messages() -> AsyncIterator[Staged]:
            for (_, date, _), flags, source in zip(items, kept, sources, strict=True):
                yield source, flags, date

        results = await ingest_many(s.storage, owner, box.id, messages(), claim_recent=claim)
    for r in results:
        claimed = None if r.recent_floor is None else (r.recent_floor, r.uid)
        entry = r.entry if len(results) == 1 else None
        s.wrote_to(box.id, claimed, entry, owner_id=owner.id)
    # RFC 4315 section 3 / RFC 3502 section 6.3.11: the UID set, in order.
    uid_set = encode.sequence_set([r.uid for r in results]).decode()
    return ok("APPEND completed", f"APPENDUID {results[0].uidvalidity} {uid_set}")
