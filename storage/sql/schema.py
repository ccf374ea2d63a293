"""The SQL schema of a shard database and its versioned migrations.

Every shard database (and the default one, which also holds the directory
and the outbound queue) has the same tables; only the full-text index DDL is
dialect-specific. Migrations are an ordered list of steps, each applied once
in its own transaction and recorded in ``schema_version``: a schema change is
a new step, never "drop and recreate".
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Awaitable, Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateColumn

from storage.blob.pack import PG_SCHEMA_SQL as PG_PACK_SCHEMA_SQL
from storage.blob.pack import SCHEMA_SQL as PACK_SCHEMA_SQL
from storage.model import SYSTEM_FLAGS

log = logging.getLogger(__name__)

# SQLite only auto-assigns rowid keys to columns declared exactly INTEGER PRIMARY KEY.
Id = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", Float, nullable=False),  # epoch seconds
)

# --- directory (lives in the default shard's database) ---------------------

domains = Table(
    "domains",
    metadata,
    Column("id", Id, primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    sqlite_autoincrement=True,  # ids are never reused: see _v8_ids_never_reused
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Id, primary_key=True),
    Column("address", String(320), nullable=False, unique=True),  # lower-case
    Column("domain_id", Id, ForeignKey("domains.id"), nullable=False, index=True),
    Column("password_hash", Text, nullable=False),
    Column("shard", String(64), nullable=False),
    Column("quota_bytes", BigInteger, nullable=True),
    Column("created", Float, nullable=False),  # epoch seconds
    sqlite_autoincrement=True,  # ids are never reused: see _v8_ids_never_reused
)

aliases = Table(
    "aliases",
    metadata,
    Column("id", Id, primary_key=True),
    Column("source", String(320), nullable=False, index=True),  # address or "@domain"
    Column("target", String(320), nullable=False),
    UniqueConstraint("source", "target", name="aliases_source_target"),
    sqlite_autoincrement=True,  # ids are never reused: see _v8_ids_never_reused
)

# Secrets every instance of the site shares (the HTTP token key...): kept
# here, not in one host's data dir, so instances on other hosts agree.
shared_secrets = Table(
    "shared_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
    Column("created", Float, nullable=False),  # epoch seconds
)

# DKIM signing keys (RFC 6376), one per domain and selector, shared like the
# secrets above: every instance's queue workers sign with them.
dkim_keys = Table(
    "dkim_keys",
    metadata,
    Column("domain", String(255), primary_key=True),  # lower-case A-labels
    Column("selector", String(63), primary_key=True),  # RFC 6376 section 3.1: one DNS label
    Column("private_pem", LargeBinary, nullable=False),  # PKCS#8, unencrypted
    Column("created", Float, nullable=False),  # epoch seconds
)

# DMARC aggregate reports received (RFC 7489 section 7.2, appendix C), in
# the directory's database: one row per report, one per <record> of it.
dmarc_reports = Table(
    "dmarc_reports",
    metadata,
    Column("id", Id, primary_key=True),
    Column("org_name", String(255), nullable=False),
    Column("report_id", String(255), nullable=False),
    Column("email", String(320), nullable=True),
    Column("domain", String(255), nullable=False, index=True),  # policy_published, lower-case
    Column("date_begin", BigInteger, nullable=False),  # epoch seconds (appendix C DateRangeType)
    Column("date_end", BigInteger, nullable=False),
    Column("policy", Text, nullable=False),  # policy_published as "p=none; sp=...; pct=..."
    Column("received", Float, nullable=False),
    UniqueConstraint("org_name", "report_id", name="uq_dmarc_reports_org_id"),
    sqlite_autoincrement=True,
)

dmarc_report_rows = Table(
    "dmarc_report_rows",
    metadata,
    Column("id", Id, primary_key=True),
    Column("report", BigInteger, ForeignKey("dmarc_reports.id"), nullable=False, index=True),
    Column("source_ip", String(45), nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("disposition", String(16), nullable=False),
    Column("dkim", String(16), nullable=False),  # policy_evaluated (aligned) results
    Column("spf", String(16), nullable=False),
    Column("header_from", String(255), nullable=False),
    Column("auth", Text, nullable=False),  # auth_results, "dkim=d:result spf=d:result ..."
    sqlite_autoincrement=True,
)

# The columns that name one tally row (all but policy, rua and count).
DMARC_TALLY_KEY = (
    "day",
    "policy_domain",
    "header_from",
    "source_ip",
    "disposition",
    "dkim",
    "spf",
    "dkim_auth",
    "spf_auth",
)
# What our MX saw of the domains whose DMARC record asks for aggregate
# reports (rua=), one row per tuple per UTC day with its count (section 7.2).
dmarc_tally = Table(
    "dmarc_tally",
    metadata,
    Column("day", Integer, nullable=False),  # epoch seconds // 86400 (UTC)
    Column("policy_domain", String(255), nullable=False),
    Column("header_from", String(255), nullable=False),
    Column("source_ip", String(45), nullable=False),
    Column("disposition", String(16), nullable=False),
    Column("dkim", String(8), nullable=False),  # aligned: pass or fail
    Column("spf", String(8), nullable=False),
    Column("dkim_auth", String(500), nullable=False),  # "d:result ..." of each signature
    Column("spf_auth", String(300), nullable=False),  # "domain:result:scope" or ""
    Column("policy", String(255), nullable=False),  # the record's p, sp, pct, adkim, aspf
    Column("rua", String(500), nullable=False),  # the mailto: addresses, comma separated
    Column("count", BigInteger, nullable=False),
    UniqueConstraint(*DMARC_TALLY_KEY, name="uq_dmarc_tally_tuple"),
)

# --- mail store (per shard) -------------------------------------------------

# Per-account counters of this shard. Its row is locked first by every write
# of the account, which serialises them (change ids, quota, UIDVALIDITY).
shard_accounts = Table(
    "shard_accounts",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("last_change_id", BigInteger, nullable=False),
    Column("next_uidvalidity", BigInteger, nullable=False),
    Column("quota_bytes", BigInteger, nullable=True),
    Column("used_bytes", BigInteger, nullable=False),  # sum of entry sizes (RFC 9208 STORAGE)
    # v10 (online moves, storage/move.py): non-NULL while the account is
    # being moved off or onto this shard, and after it moved away. Every
    # write reads it in the row it locks first, so none lands once it is
    # set: "out:<target>", "in:<source>", "gone:<target>".
    Column("fence", String(80), nullable=True),
)

mailboxes = Table(
    "mailboxes",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", BigInteger, nullable=False),
    Column("name", String(1024), nullable=False),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uidnext", BigInteger, nullable=False),
    Column("highestmodseq", BigInteger, nullable=False),
    Column("recent_floor", BigInteger, nullable=False),
    Column("special_use", String(32), nullable=True),
    # The subscription flag before v9, which moved it to ``subscriptions``:
    # read only by that step; new rows write False.
    Column("subscribed", Boolean, nullable=False),
    UniqueConstraint("account_id", "name", name="mailboxes_account_name"),
    sqlite_autoincrement=True,  # ids are never reused: see _v8_ids_never_reused
)

# RFC 3501 section 6.3.6: the subscription list holds names, not mailboxes;
# a name may be subscribed before its mailbox exists and after it is deleted.
# Created by _v9_subscriptions (not a v1 table).
subscriptions = Table(
    "subscriptions",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", String(1024), primary_key=True),
)

# Per-account sender lists and Junk threshold (issue #22,
# delivery/acctpolicy.py): an entry is on one list at a time. Created by
# _v24_spam_policy (not a v1 table).
sender_lists = Table(
    "sender_lists",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("entry", String(330), primary_key=True),  # normalised address or domain
    Column("list", String(8), nullable=False),  # "allow" or "block"
    Column("created", Float, nullable=False),  # epoch seconds
)

spam_settings = Table(
    "spam_settings",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("junk_threshold", Float, nullable=True),  # None: the spam filter's own
)

# RFC 5464 METADATA entries of an account, in its shard: the server's
# (mailbox_id 0) and each mailbox's, "/private/..." and "/shared/..." names
# lower-case (section 3.2: entry names are case-insensitive). Created by
# _v29_metadata (not a v1 table); storage/sql/metadata.py.
metadata_entries = Table(
    "metadata_entries",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("mailbox_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", String(1024), primary_key=True),  # printable ASCII
    Column("value", LargeBinary, nullable=False),
)

# RFC 5464 section 3.3: a /private entry is the user's own. Those another
# account (a grantee, RFC 4314) sets on a mailbox shared with it live in the
# mailbox owner's shard beside the mailbox, keyed by the mailbox's id and the
# grantee's account id: a RENAME keeps them, DELETE drops them, an account
# move carries them with the owner's mailboxes, removing the grantee drops
# them in every shard. The owner's own and every /shared entry stay in
# ``metadata_entries``. Created by _v35_grantee_metadata; storage/sql/metadata.py.
grantee_metadata = Table(
    "grantee_metadata",
    metadata,
    Column("mailbox_id", BigInteger, primary_key=True, autoincrement=False),
    Column("grantee_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", String(1024), primary_key=True),  # "/private/...", lower-case
    Column("account_id", BigInteger, nullable=False, index=True),  # the owner
    Column("value", LargeBinary, nullable=False),
    Index("grantee_metadata_grantee", "grantee_id"),
)

# RFC 4314 access control lists of an account's mailboxes, in its shard
# beside them: keyed by the mailbox's id (a RENAME keeps them, DELETE drops
# them), the grantee by account id (0: "anyone"), so renaming an account
# keeps its grants. Created by _v32_mailbox_acl; storage/sql/acl.py.
mailbox_acl = Table(
    "mailbox_acl",
    metadata,
    Column("mailbox_id", BigInteger, primary_key=True, autoincrement=False),
    Column("grantee_id", BigInteger, primary_key=True, autoincrement=False),
    Column("account_id", BigInteger, nullable=False, index=True),  # the owner
    Column("rights", String(32), nullable=False),  # letters of storage.acl.RIGHTS
    Index("mailbox_acl_grantee", "grantee_id"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", BigInteger, nullable=False),
    Column("blob_key", String(64), nullable=False, index=True),
    Column("size", BigInteger, nullable=False),
    Column("parsed", Text, nullable=False),  # ParsedMessage as JSON
    Column("thread_id", BigInteger, nullable=True),
    Column("message_id_header", String(998), nullable=True),
    Column("sent_date", Float, nullable=True),  # epoch seconds
    Column("sent_day", Integer, nullable=True),  # date.toordinal() in the sender's zone
    Column("subject", Text, nullable=False),
    Column("from_text", Text, nullable=False),
    Column("to_text", Text, nullable=False),
    Column("cc_text", Text, nullable=False),
    Column("body_text", Text, nullable=False),
    Column("created", Float, nullable=False),
    Index("messages_account_msgid", "account_id", "message_id_header"),
    sqlite_autoincrement=True,  # ids are never reused: see _v8_ids_never_reused
)

mailbox_entries = Table(
    "mailbox_entries",
    metadata,
    Column("mailbox_id", BigInteger, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("message_id", BigInteger, nullable=False, index=True),
    Column("sysflags", Integer, nullable=False),  # bit mask of SYSTEM_FLAGS
    Column("keywords", Text, nullable=False),  # " kw1 kw2 " (space-delimited for LIKE)
    Column("modseq", BigInteger, nullable=False),
    Column("internal_date", BigInteger, nullable=False),  # epoch microseconds
    Column("internal_tz", Integer, nullable=False),  # UTC offset, minutes
    Column("internal_day", Integer, nullable=False),  # date.toordinal() in that zone
    Column("size", BigInteger, nullable=False),  # copy of messages.size for quota/status
    # v11: where the entry sits in a folder list, epoch microseconds: the
    # message's Date, never later than internal_date (storage.sql.mailstore._list_date).
    # Indexed with (mailbox_id, uid) so a page is a keyset range, not a sort.
    Column("list_date", BigInteger, nullable=False, server_default=text("0")),
    # v28: when the entry was made in this mailbox (APPEND, COPY, MOVE,
    # delivery), epoch microseconds UTC: the RFC 8514 save date. NULL for
    # entries older than the step (their save date is their internal date).
    Column("saved_at", BigInteger, nullable=True),
    # v31: the RFC 5256 / RFC 5957 sort and thread keys (storage.sortkeys
    # EntryKeys, written with the entry; storage.sql.sortkeys reads them).
    # NULL only for an entry an older process wrote: backfilled.
    Column("sort_date", Float, nullable=True),  # epoch seconds
    Column("sort_reply", Boolean, nullable=True),
    # Octet strings compared as octets (i;ascii-casemap keys).
    *(
        Column(f"sort_{name}", LargeBinary, nullable=True)
        for name in ("subject", "from", "to", "cc", "display_from", "display_to")
    ),
    Column("thread_ids", Text, nullable=True),  # storage.sortkeys.encode_thread_ids
    UniqueConstraint("mailbox_id", "uid", name="mailbox_entries_mailbox_uid"),
    Index("mailbox_entries_mailbox_modseq", "mailbox_id", "modseq"),
)

expunged = Table(
    "expunged",
    metadata,
    Column("mailbox_id", BigInteger, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("modseq", BigInteger, nullable=False),
    Index("expunged_mailbox_modseq", "mailbox_id", "modseq"),
)

change_log = Table(
    "change_log",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),
    Column("mailbox_id", BigInteger, nullable=True),
    Column("uid", BigInteger, nullable=True),
    Column("modseq", BigInteger, nullable=True),
    Column("at", Float, nullable=False),
    Column("data", Text, nullable=False),  # JSON object
)

# v10: an account move in progress (directory), one row per account, from
# its start until the source copy is removed. ``state``: storage/move.py.
account_moves = Table(
    "account_moves",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("source", String(64), nullable=False),
    Column("target", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("started_at", Float, nullable=False),  # epoch seconds
    Column("updated_at", Float, nullable=False),
)

# v10: on a move's target shard, which source row became which target row
# (``kind``: "mailbox", "message", "thread"), written with the copied rows
# in one transaction so that a resumed move skips what is already there.
moved_ids = Table(
    "moved_ids",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(8), primary_key=True),
    Column("source_id", BigInteger, primary_key=True, autoincrement=False),
    Column("target_id", BigInteger, nullable=False),
)

locks = Table(
    "locks",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("expires", Float, nullable=False),  # epoch seconds
)

# Blobs garbage collection is deleting, or deleted lately, recorded in every
# database whose rows may name them (storage/blob/deleting.py): a writer
# naming one in its transaction stores it again first. ``done_at`` is NULL
# while the deletion may still happen.
blob_deletions = Table(
    "blob_deletions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("store", String(255), nullable=False),
    Column("key", String(64), nullable=False, index=True),
    Column("marked_at", Float, nullable=False),  # epoch seconds
    Column("done_at", Float, nullable=True),
)

# --- outbound queue (a partition in every shard: storage/queue.py) -----------

queue_messages = Table(
    "queue_messages",
    metadata,
    Column("id", Id, primary_key=True),
    Column("sender", String(320), nullable=False),  # "" is the null reverse-path
    Column("blob_key", String(64), nullable=False),
    Column("created", Float, nullable=False),
    Column("next_attempt", Float, nullable=False, index=True),
    Column("expires", Float, nullable=False),
    Column("lease_owner", String(255), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # queued, done, error
    Column("error", Text, nullable=True),
    # v4 (outbound queue workers): see _v4_outbound_queue.
    Column("held", Boolean, nullable=False, server_default=false()),
    Column("warned", Boolean, nullable=False, server_default=false()),  # delay DSN sent
    # v28 (RFC 3461 section 4.3, 4.4): MAIL's RET (FULL, HDRS) and ENVID (xtext as sent).
    Column("dsn_ret", String(4), nullable=True),
    Column("dsn_envid", String(100), nullable=True),
    # RFC 8689 section 4.1: MAIL FROM had REQUIRETLS; relayed only as section 4.2.1 says.
    Column("require_tls", Boolean, nullable=False, server_default=false()),
    # v35, RFC 8460 section 3: a TLS-RPT report of ours, sent despite TLS failures.
    Column("tls_report", Boolean, nullable=False, server_default=false()),
    sqlite_autoincrement=True,  # ids are never reused: see _v8_ids_never_reused
)

queue_recipients = Table(
    "queue_recipients",
    metadata,
    Column("id", Id, primary_key=True),
    Column("queue_id", BigInteger, ForeignKey("queue_messages.id"), nullable=False, index=True),
    Column("address", String(320), nullable=False),
    Column("status", String(16), nullable=False),  # pending, delivered, deferred, failed
    Column("last_reply", Text, nullable=True),
    # v4: when the status last changed, and a later DSN's verdict (hard, soft).
    Column("updated", Float, nullable=True),
    Column("feedback", String(16), nullable=True),
    # v28 (RFC 3461 section 4.1, 4.2): RCPT's NOTIFY ("NEVER" or a comma list
    # of SUCCESS, FAILURE, DELAY) and ORCPT (addr-type;xtext as sent).
    Column("dsn_notify", String(32), nullable=True),
    Column("dsn_orcpt", String(500), nullable=True),
    sqlite_autoincrement=True,  # ids are never reused: see _v8_ids_never_reused
)

# v4: recipients that bounced; suppressed ones fail at once, before any attempt.
queue_suppressions = Table(
    "queue_suppressions",
    metadata,
    Column("address", String(320), primary_key=True),  # lower-case
    Column("hard_bounces", Integer, nullable=False),
    Column("soft_bounces", Integer, nullable=False),
    Column("suppressed", Boolean, nullable=False),
    Column("last_status", String(16), nullable=True),  # RFC 3463 code
    Column("last_diagnostic", Text, nullable=True),
    Column("updated", Float, nullable=False),
)

# v27: accounts over a sending limit (delivery/limits.py), in the account's
# home partition of the queue (storage/queue.py): while its row is here, its
# outbound mail is queued held, until ``mailctl queue release --account``.
queue_held_senders = Table(
    "queue_held_senders",
    metadata,
    Column("address", String(320), primary_key=True),  # lower-case
    Column("reason", Text, nullable=False),  # the limit it went over
    Column("since", Float, nullable=False),  # epoch seconds
)

# v26: the built-in anti-spam engine's per-account Bayes counts
# (delivery/bayes.py, storage/sql/spamtokens.py). A token is a 63-bit hash
# of a word (words are not kept in clear); token 0 is the account's row of
# learned message totals (spam, ham), read with the tokens in one query.
spam_tokens = Table(
    "spam_tokens",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("token", BigInteger, primary_key=True, autoincrement=False),
    Column("spam", BigInteger, nullable=False),
    Column("ham", BigInteger, nullable=False),
)

# v26: which message (by blob key) the account taught as spam or ham, so a
# message learned twice counts once and one moved back is relearned.
spam_learned = Table(
    "spam_learned",
    metadata,
    Column("account_id", BigInteger, primary_key=True, autoincrement=False),
    Column("blob_key", String(64), primary_key=True),
    Column("spam", Boolean, nullable=False),
)

V1_TABLES = [
    domains,
    accounts,
    aliases,
    shard_accounts,
    mailboxes,
    messages,
    mailbox_entries,
    expunged,
    change_log,
    locks,
    queue_messages,
    queue_recipients,
]


# --- migrations ----------------------------------------------------------------

Step = Callable[[AsyncConnection], Awaitable[None]]


async def _v1_tables(conn: AsyncConnection) -> None:
    # The current table definitions are the v1 shape. When a later step alters a
    # table, freeze a copy of the v1 definitions here first.
    await conn.run_sync(lambda sync: metadata.create_all(sync, tables=V1_TABLES))


async def _create_fts(conn: AsyncConnection, options: str) -> None:
    """SQLite: the external-content FTS5 table over the messages' search
    columns (no second copy of the text) with ``options``, kept in step by
    insert and delete triggers."""
    cols = "subject, from_text, to_text, cc_text, body_text"
    await conn.exec_driver_sql(
        f"CREATE VIRTUAL TABLE messages_fts USING fts5({cols}, content='messages', "
        f"content_rowid='id', {options})"
    )
    new = "new.subject, new.from_text, new.to_text, new.cc_text, new.body_text"
    old = "old.subject, old.from_text, old.to_text, old.cc_text, old.body_text"
    await conn.exec_driver_sql(
        "CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN "
        f"INSERT INTO messages_fts(rowid, {cols}) VALUES (new.id, {new}); END"
    )
    await conn.exec_driver_sql(
        "CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages BEGIN "
        f"INSERT INTO messages_fts(messages_fts, rowid, {cols}) "
        f"VALUES ('delete', old.id, {old}); END"
    )


async def _v2_full_text(conn: AsyncConnection) -> None:
    """Full-text index over subject, addresses and body text."""
    if conn.dialect.name == "sqlite":
        # An external-content FTS5 table (no second copy of the text), kept in
        # step by triggers; the trigram tokenizer answers substring queries.
        await _create_fts(conn, "tokenize='trigram'")
    else:
        await conn.exec_driver_sql(
            "ALTER TABLE messages ADD COLUMN search tsvector GENERATED ALWAYS AS ("
            "to_tsvector('simple', coalesce(subject, '') || ' ' || coalesce(from_text, '')"
            " || ' ' || coalesce(to_text, '') || ' ' || coalesce(cc_text, '') || ' ' ||"
            " left(coalesce(body_text, ''), 200000))) STORED"
        )
        # Capped input: a tsvector may not exceed 1 MB.
        await conn.exec_driver_sql("CREATE INDEX messages_search ON messages USING gin (search)")


async def _v3_account_indexes(conn: AsyncConnection) -> None:
    await conn.exec_driver_sql("CREATE INDEX mailboxes_account ON mailboxes (account_id)")
    await conn.exec_driver_sql(
        "CREATE INDEX queue_messages_status ON queue_messages (status, next_attempt)"
    )


# Columns added by step 4. The v1 step builds tables from the current
# definitions, so a database created after this step already has them; the
# step adds only what an older database lacks.
_V4_COLUMNS = (
    (queue_messages, ("held", "warned")),
    (queue_recipients, ("updated", "feedback")),
)


async def _add_missing_columns(conn: AsyncConnection, table: Table, names: tuple[str, ...]) -> None:
    """Adds the columns of ``table`` named ``names`` that the database lacks
    (a database made after the step that adds them has them from v1)."""

    def existing(sync, name: str) -> set[str]:
        from sqlalchemy import inspect

        return {c["name"] for c in inspect(sync).get_columns(name)}

    have = await conn.run_sync(existing, table.name)
    for name in names:
        if name not in have:
            ddl = CreateColumn(table.c[name]).compile(dialect=conn.dialect)
            await conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")


async def _v4_outbound_queue(conn: AsyncConnection) -> None:
    """Outbound queue workers: hold flag, delay-warning flag, per-recipient
    timestamps and bounce feedback, the suppression list, a lease index."""
    for table, names in _V4_COLUMNS:
        await _add_missing_columns(conn, table, names)
    await conn.run_sync(lambda sync: queue_suppressions.create(sync, checkfirst=True))
    await conn.exec_driver_sql(
        "CREATE INDEX queue_recipients_address ON queue_recipients (address)"
    )


async def _v5_fts_without_positions(conn: AsyncConnection) -> None:
    """SQLite: rebuild the trigram index with ``detail=none``.

    Search uses the index only to narrow the candidates of a substring
    match, then checks each one exactly (``storage/sql/criteria.py``), so it
    needs which messages hold every trigram of the value, not where. Without
    the positions the index is about 2.5 times smaller and a delivery's
    insert costs about a third less CPU. Queries become an AND of single
    trigrams (``detail=none`` has no phrases). PostgreSQL: nothing to do.
    """
    if conn.dialect.name != "sqlite":
        return
    await conn.exec_driver_sql("DROP TRIGGER IF EXISTS messages_fts_ai")
    await conn.exec_driver_sql("DROP TRIGGER IF EXISTS messages_fts_ad")
    await conn.exec_driver_sql("DROP TABLE IF EXISTS messages_fts")
    await _create_fts(conn, "tokenize='trigram', detail=none")
    # Index what is already stored (external content: read from messages).
    await conn.exec_driver_sql("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")


async def _v6_fts_apart(conn: AsyncConnection) -> None:
    """SQLite: the trigram index moves to its own file, filled in the
    background (``storage/sql/fts.py``); deliveries only queue their id.

    The old in-database index and its triggers go. Every stored message is
    queued, so the indexer re-indexes them in the background; until then
    searches check queued messages exactly, without the index.
    PostgreSQL: nothing to do.
    """
    if conn.dialect.name != "sqlite":
        return
    await conn.exec_driver_sql("DROP TRIGGER IF EXISTS messages_fts_ai")
    await conn.exec_driver_sql("DROP TRIGGER IF EXISTS messages_fts_ad")
    await conn.exec_driver_sql("DROP TABLE IF EXISTS messages_fts")
    # AUTOINCREMENT: a queue position is never handed out twice, so the
    # indexer's "everything up to seq N" never covers a row it did not see.
    await conn.exec_driver_sql(
        "CREATE TABLE fts_pending (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
        "message_id INTEGER NOT NULL)"
    )
    await conn.exec_driver_sql("CREATE INDEX fts_pending_message ON fts_pending (message_id)")
    await conn.exec_driver_sql(
        "CREATE TABLE fts_deleted (message_id INTEGER NOT NULL, subject TEXT, "
        "from_text TEXT, to_text TEXT, cc_text TEXT, body_text TEXT)"
    )
    await conn.exec_driver_sql("INSERT INTO fts_pending (message_id) SELECT id FROM messages")
    await conn.exec_driver_sql(
        "CREATE TRIGGER fts_queue AFTER INSERT ON messages BEGIN "
        "INSERT INTO fts_pending (message_id) VALUES (new.id); END"
    )
    # A message still queued was never indexed: dropping it from the queue
    # is enough. Otherwise the index needs the values it was indexed with.
    await conn.exec_driver_sql(
        "CREATE TRIGGER fts_unqueue AFTER DELETE ON messages BEGIN "
        "INSERT INTO fts_deleted SELECT old.id, old.subject, old.from_text, old.to_text, "
        "old.cc_text, old.body_text "
        "WHERE NOT EXISTS (SELECT 1 FROM fts_pending WHERE message_id = old.id); "
        "DELETE FROM fts_pending WHERE message_id = old.id; END"
    )


async def _v7_blob_pack(conn: AsyncConnection) -> None:
    """SQLite: the blob pack's table (``storage/blob/pack.py``) in the
    database itself. A one-host site's small messages are stored here, in
    the same transaction as the rows that name them, instead of in the
    blob folder's ``pack.sqlite``, which stays readable. The pack's own
    statement, so the two never differ. PostgreSQL: nothing to do (its
    blobs are files or objects)."""
    if conn.dialect.name != "sqlite":
        return
    await conn.exec_driver_sql(PACK_SCHEMA_SQL)


# The tables whose ids leave storage, and where else a deleted row's id may
# still be named ("table.column"): the high-water mark the rebuilt table
# starts above, since rows deleted before v8 left no sequence behind.
_ID_TRACES: dict[str, tuple[str, ...]] = {
    "domains": ("accounts.domain_id",),
    "accounts": (
        "shard_accounts.account_id",
        "mailboxes.account_id",
        "messages.account_id",
        "change_log.account_id",
    ),
    "aliases": (),
    "mailboxes": (
        "mailbox_entries.mailbox_id",
        "expunged.mailbox_id",
        "change_log.mailbox_id",
    ),
    "messages": (
        "messages.thread_id",
        "mailbox_entries.message_id",
        "fts_pending.message_id",
        "fts_deleted.message_id",
    ),
    "queue_messages": ("queue_recipients.queue_id",),
    "queue_recipients": (),
}
_REBUILT = "{}__v8"


def _autoincrement_ddl(table: str, sql: str) -> str:
    """``CREATE TABLE`` text of ``table`` as SQLAlchemy wrote it, renamed and
    with ``id INTEGER PRIMARY KEY AUTOINCREMENT``: every other column and
    constraint stays as the database has it."""
    new, renamed = re.subn(
        rf"^CREATE TABLE {table} \(", f"CREATE TABLE {_REBUILT.format(table)} (", sql
    )
    new, pk_column = re.subn(
        r"\bid INTEGER NOT NULL,", "id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,", new, count=1
    )
    new, pk_constraint = re.subn(r",\s*PRIMARY KEY \(id\)", "", new)
    if (renamed, pk_column, pk_constraint) != (1, 1, 1):
        raise RuntimeError(f"schema v8: unexpected definition of table {table}: {sql}")
    return new


async def _rebuild_with_autoincrement(conn: AsyncConnection, table: str) -> None:
    """SQLite cannot alter a primary key: copy the table into a new one
    declared AUTOINCREMENT, drop the old one, rename the new one into place
    and recreate the old one's indexes and triggers (the procedure of
    https://www.sqlite.org/lang_altertable.html#otheralter)."""
    rows = await conn.exec_driver_sql(
        "SELECT type, sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL", (table,)
    )
    found = rows.all()
    (create,) = [sql for kind, sql in found if kind == "table"]
    if "AUTOINCREMENT" in create.upper():
        return  # made after v8 was written: the v1 step declared it so
    dependents = [sql for kind, sql in found if kind in ("index", "trigger")]
    columns = ", ".join(
        f'"{r[1]}"' for r in await conn.exec_driver_sql(f"PRAGMA table_info({table})")
    )
    rebuilt = _REBUILT.format(table)
    await conn.exec_driver_sql(_autoincrement_ddl(table, create))
    await conn.exec_driver_sql(
        f"INSERT INTO {rebuilt} ({columns}) SELECT {columns} FROM {table} ORDER BY id"
    )
    await conn.exec_driver_sql(f"DROP TABLE {table}")
    # Other tables' foreign keys name "{table}", so they refer to the new
    # table once it is renamed; nothing names the temporary name.
    await conn.exec_driver_sql(f"ALTER TABLE {rebuilt} RENAME TO {table}")
    for sql in dependents:
        await conn.exec_driver_sql(sql)


async def _raise_sequence(conn: AsyncConnection, table: str) -> None:
    """Starts ``table``'s AUTOINCREMENT counter above every id a trace names."""
    parts = [f"SELECT max(id) AS v FROM {table}", "SELECT seq FROM sqlite_sequence WHERE name = ?"]
    parts += [f"SELECT max({c}) FROM {t}" for t, c in (x.split(".") for x in _ID_TRACES[table])]
    union = " UNION ALL ".join(parts)
    high = (
        await conn.exec_driver_sql(f"SELECT coalesce(max(v), 0) FROM ({union})", (table,))
    ).scalar()
    await conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
    await conn.exec_driver_sql(
        "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, int(high))
    )


async def _v8_ids_never_reused(conn: AsyncConnection) -> None:
    """SQLite: ids that leave storage are never handed out twice.

    A plain ``INTEGER PRIMARY KEY`` gives a new row the highest id plus
    one, so deleting the newest message (an expunge) let the next delivery
    take its id, and a cache or client keyed by it saw another message
    (the same for mailboxes, accounts, domains, queue entries).
    ``AUTOINCREMENT`` keeps the highest id ever used in ``sqlite_sequence``.
    The rows are copied in this step's transaction, without foreign key
    enforcement (a parent table is dropped and replaced), then checked.
    PostgreSQL: nothing to do, ``BIGSERIAL`` sequences
    never go back.
    """
    if conn.dialect.name != "sqlite":
        return
    for table in _ID_TRACES:
        await _rebuild_with_autoincrement(conn, table)
        await _raise_sequence(conn, table)
    # Foreign keys are not enforced during migrations (Database.write): check.
    broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
    if broken:
        raise RuntimeError(f"schema v8: foreign keys broken by the rebuild: {broken[:5]}")


async def _v9_subscriptions(conn: AsyncConnection) -> None:
    """The subscription list in a table of its own, so that SUBSCRIBE takes a
    name that does not exist and a subscription outlives DELETE (RFC 3501
    sections 6.3.6 and 6.3.9, RFC 5258 section 3.4 \\NonExistent). Every
    mailbox subscribed before is subscribed after."""
    await conn.run_sync(lambda sync: subscriptions.create(sync, checkfirst=True))
    await conn.execute(
        subscriptions.insert().from_select(
            ["account_id", "name"],
            select(mailboxes.c.account_id, mailboxes.c.name).where(mailboxes.c.subscribed),
        )
    )


async def _v10_account_moves(conn: AsyncConnection) -> None:
    """Online moves of an account between shards (``storage/move.py``): the
    per-account fence on ``shard_accounts``, the move record and the
    source -> target id map."""
    await _add_missing_columns(conn, shard_accounts, ("fence",))
    await conn.run_sync(lambda sync: account_moves.create(sync, checkfirst=True))
    await conn.run_sync(lambda sync: moved_ids.create(sync, checkfirst=True))


async def _v11_list_order(conn: AsyncConnection) -> None:
    """Folder lists page by an index instead of sorting a whole mailbox:
    ``mailbox_entries.list_date`` (see the table) filled for stored entries,
    and the index (mailbox_id, list_date, uid) that a page walks backwards."""
    await _add_missing_columns(conn, mailbox_entries, ("list_date",))
    sent_us = "CAST(m.sent_date * 1000000 AS BIGINT)"
    await conn.exec_driver_sql(
        "UPDATE mailbox_entries SET list_date = coalesce((SELECT CASE "
        f"WHEN m.sent_date IS NULL OR {sent_us} >= mailbox_entries.internal_date "
        "THEN mailbox_entries.internal_date "
        f"WHEN {sent_us} < 0 THEN 0 ELSE {sent_us} END "
        "FROM messages m WHERE m.id = mailbox_entries.message_id), internal_date)"
    )
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS mailbox_entries_mailbox_list "
        "ON mailbox_entries (mailbox_id, list_date, uid)"
    )


async def _v12_shared_secrets(conn: AsyncConnection) -> None:
    """Secrets every instance shares, in the directory's database (issue
    #19): the HTTP token key moves there from ``data_dir/http_secret``
    (adopted at the next start, see ``httpapi.service``)."""
    await conn.run_sync(lambda sync: shared_secrets.create(sync, checkfirst=True))


# SQLite query planner statistics (sqlite_stat1, "N rows, rows per value of
# the first column, of the first two..."), written once instead of measured
# by ANALYZE: the shape of a mail shard, not of whatever it held on the day.
# Without them SQLite guesses ten rows per indexed value and reads a search's
# whole account (every mailbox, every entry) rather than the few messages
# the full-text index returned; with them it starts from those.
_SQLITE_STATS = (
    ("mailbox_entries", "sqlite_autoindex_mailbox_entries_1", "1000000 20000 1"),
    ("mailbox_entries", "ix_mailbox_entries_message_id", "1000000 1"),
    ("mailbox_entries", "mailbox_entries_mailbox_modseq", "1000000 20000 2"),
    ("mailbox_entries", "mailbox_entries_mailbox_list", "1000000 20000 1 1"),
    ("mailboxes", "mailboxes_account", "100000 10"),
    ("mailboxes", "sqlite_autoindex_mailboxes_1", "100000 10 1"),
    ("messages", "messages_account_msgid", "1000000 50000 1"),
    ("messages", "ix_messages_blob_key", "1000000 1"),
)


async def _v13_sqlite_planner_stats(conn: AsyncConnection) -> None:
    """SQLite: fixed planner statistics (see _SQLITE_STATS), so that plans
    fit a big mailbox from the first message on. PostgreSQL: autovacuum's
    ANALYZE keeps its statistics; nothing to do."""
    if conn.dialect.name != "sqlite":
        return
    # ANALYZE of the schema table alone creates sqlite_stat1 without reading
    # any table; the second one loads the rows written here into the planner.
    await conn.exec_driver_sql("ANALYZE sqlite_schema")
    for table, index, stat in _SQLITE_STATS:
        await conn.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE idx = ?", (index,))
        await conn.exec_driver_sql(
            "INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", (table, index, stat)
        )
    await conn.exec_driver_sql("ANALYZE sqlite_schema")


# PostgreSQL: every searched text column of a message as one string, the
# expression of the trigram index below. storage/sql/criteria.py writes the
# same expression in its narrowing condition, which is how the planner
# matches the two: change both together.
PG_SEARCH_TEXT = (
    "(messages.subject || ' ' || messages.from_text || ' ' || messages.to_text"
    " || ' ' || messages.cc_text || ' ' || messages.body_text)"
)


# SQLite: the subject-only trigram table of step 19 (in the main database;
# storage/sql/criteria.py queries it for SEARCH SUBJECT).
SUBJECT_FTS = "messages_subject_fts"


async def _v14_pg_trigram_search(conn: AsyncConnection) -> None:
    """PostgreSQL: a trigram GIN index (pg_trgm) over the searched text, so
    that substring searches (RFC 3501 section 6.4.4; inside a word too,
    which the word-based tsvector of step 2 cannot answer) read the few
    messages holding every trigram of the value instead of the whole
    account. pg_trgm is a trusted extension (PostgreSQL 13 and later): the
    database owner may create it. Where it cannot be created, searches
    still answer, by scanning. SQLite: its own trigram index (step 6)."""
    if conn.dialect.name != "postgresql":
        return
    try:
        async with conn.begin_nested():  # a refusal must not abort the migration
            await conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DBAPIError as exc:
        log.warning(
            "pg_trgm unavailable (%s): text searches will scan every message", str(exc.orig).strip()
        )
        return
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS messages_text_trgm ON messages "
        f"USING gin ({PG_SEARCH_TEXT} gin_trgm_ops)"
    )


async def _v15_dkim_keys(conn: AsyncConnection) -> None:
    """DKIM keys in the directory's database (issue #19), so every instance
    signs with the key ``mailctl dkim generate`` made on any host. Key files
    of older versions (``queue.dkim_key_dir``) are still read."""
    await conn.run_sync(lambda sync: dkim_keys.create(sync, checkfirst=True))


async def _v16_snapshot_indexes(conn: AsyncConnection) -> None:
    """Two small partial indexes for IMAP SELECT on a big mailbox
    (``SqlMailStore.snapshot``), which must not read a row per message:
    the unseen entries by (mailbox, uid), for the first unseen message
    (RFC 3501 section 6.3.1), and the entries carrying keywords, for the
    FLAGS list (section 7.2.6). Each holds only the rows its condition
    names, so a write touches it only for such a row. The conditions are
    mailstore's ``_UNSEEN_TERM`` and ``_SNAPSHOT_KEYWORDS`` as SQL: keep
    them alike, or the planners stop using the indexes."""
    seen = 1 << SYSTEM_FLAGS.index("\\Seen")
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS mailbox_entries_unseen ON mailbox_entries "
        f"(mailbox_id, uid) WHERE (sysflags & {seen}) = 0"
    )
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS mailbox_entries_keywords ON mailbox_entries "
        "(mailbox_id, keywords) WHERE keywords != ' '"
    )


# PostgreSQL: the trigram index's pending list (GIN "fast update", in kB).
# A delivery appends its message's trigrams there, unsorted; a search reads
# the whole list besides the index proper, and the list is merged into the
# index in bulk by the background merger (``storage/sql/fts.py``), by
# autovacuum, or, past this size, by the insert that overflows it. Large
# enough that a delivery never pays for a merge while the merger keeps up
# (seconds of mail at several hundred messages a second), small enough
# that a search's scan of it stays a few milliseconds.
PG_TRGM_PENDING_KB = 16 * 1024


async def _v17_pg_search_index_deferred(conn: AsyncConnection) -> None:
    """PostgreSQL: searching costs a delivery less. The ``search`` tsvector
    of step 2 and its GIN index go: nothing has queried them since the
    trigram index of step 14, yet they cost about as much CPU per delivery
    as every other statement of it together. The trigram index keeps its
    insertions in a large pending list (see :data:`PG_TRGM_PENDING_KB`), so
    a delivery never merges it inline. SQLite: nothing to do (its index is
    filled in the background already, step 6)."""
    if conn.dialect.name != "postgresql":
        return
    await conn.exec_driver_sql("DROP INDEX IF EXISTS messages_search")
    await conn.exec_driver_sql("ALTER TABLE messages DROP COLUMN IF EXISTS search")
    await conn.exec_driver_sql(
        "DO $$ BEGIN IF to_regclass('messages_text_trgm') IS NOT NULL THEN "
        "ALTER INDEX messages_text_trgm SET "
        f"(fastupdate = on, gin_pending_list_limit = {PG_TRGM_PENDING_KB}); END IF; END $$"
    )


async def _v18_pg_blob_pack(conn: AsyncConnection) -> None:
    """PostgreSQL: the blob pack's table, as step 7 made it in SQLite files
    (``storage/blob/pack.py``): a delivery into this database writes its
    small message's bytes here, in the transaction of the rows that name
    it, instead of a blob file with two fsyncs of its own."""
    if conn.dialect.name != "postgresql":
        return
    for statement in PG_PACK_SCHEMA_SQL:
        await conn.exec_driver_sql(statement)


async def _v19_subject_index(conn: AsyncConnection) -> None:
    """A trigram index over subjects alone, for SEARCH SUBJECT (RFC 3501
    section 6.4.4). The full-text indexes keep no columns (SQLite's
    ``detail=none``, PostgreSQL's index over the concatenated text), so a
    word common in bodies made every message a candidate for a subject
    search. SQLite: an FTS5 trigram table over ``messages.subject``
    (external content: no copy of the text) kept in step by triggers in
    the message row's own transaction (a subject is short: a small part of
    what the body index costs, which is why that one is filled apart).
    PostgreSQL: a pg_trgm GIN index on ``subject`` (skipped where pg_trgm
    is unavailable: searches then scan, as with step 14)."""
    if conn.dialect.name == "sqlite":
        # IF NOT EXISTS: a step may run again over its own objects (a file
        # taken back to an older version, see tests/unit/test_fts_index.py).
        await conn.exec_driver_sql(
            f"CREATE VIRTUAL TABLE IF NOT EXISTS {SUBJECT_FTS} USING fts5(subject, "
            "content='messages', content_rowid='id', tokenize='trigram', detail=none)"
        )
        insert = f"INSERT INTO {SUBJECT_FTS}(rowid, subject) VALUES (new.id, new.subject);"
        delete = (
            f"INSERT INTO {SUBJECT_FTS}({SUBJECT_FTS}, rowid, subject) "
            "VALUES ('delete', old.id, old.subject);"
        )
        for name, when, action in (
            ("ai", "AFTER INSERT", insert),
            ("ad", "AFTER DELETE", delete),
            ("au", "AFTER UPDATE OF subject", f"{delete} {insert}"),
        ):
            await conn.exec_driver_sql(
                f"CREATE TRIGGER IF NOT EXISTS {SUBJECT_FTS}_{name} {when} ON messages "
                f"BEGIN {action} END"
            )
        # Index what is already stored (read from messages, the content table).
        await conn.exec_driver_sql(f"INSERT INTO {SUBJECT_FTS}({SUBJECT_FTS}) VALUES ('rebuild')")
        return
    has_trgm = (
        await conn.exec_driver_sql("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")
    ).first()
    if has_trgm is None:
        log.warning("pg_trgm unavailable: SEARCH SUBJECT will scan every message")
        return
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS messages_subject_trgm ON messages "
        "USING gin (subject gin_trgm_ops)"
    )


async def _v20_pg_word_index(conn: AsyncConnection) -> None:
    """PostgreSQL: substring search by words, not trigrams (issue #20). The
    trigram index of step 14 over the whole text cost a delivery one index
    key per distinct trigram (600 to 3,500 in 5 KB of varied words, 1 to
    3.5 ms of the server's CPU to extract and merge); now a message row
    carries the CRC-32s of its distinct words (``search_words``, computed
    by the writer, see ``storage/sql/fts.py``), one GIN key per word, and
    trigrams are paid once per vocabulary word (``search_vocab``). Rows
    written before this step are filled here; a row left NULL (an account
    move copies only the columns of ``messages``) stays a candidate of
    every search through the partial index ``messages_search_unindexed``
    until the background merger fills it. SQLite: nothing (its own index,
    step 6)."""
    if conn.dialect.name != "postgresql":
        return
    from storage.sql import fts

    await conn.exec_driver_sql("ALTER TABLE messages ADD COLUMN IF NOT EXISTS search_words int4[]")
    await conn.exec_driver_sql(
        'CREATE TABLE IF NOT EXISTS search_vocab (word text COLLATE "C" NOT NULL, '
        "hash integer NOT NULL)"
    )
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS search_vocab_word ON search_vocab (word)"
    )
    has_trgm = (
        await conn.exec_driver_sql("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")
    ).first()
    if has_trgm is not None:
        await conn.exec_driver_sql(
            "CREATE INDEX IF NOT EXISTS search_vocab_trgm ON search_vocab "
            "USING gin (word gin_trgm_ops)"
        )
    else:
        log.warning("pg_trgm unavailable: a text search will scan the word list")
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS messages_search_unindexed ON messages (id) "
        "WHERE search_words IS NULL"
    )
    while await fts.index_unindexed(conn, 2000):
        pass
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS messages_search_words ON messages USING gin (search_words) "
        f"WITH (fastupdate = on, gin_pending_list_limit = {PG_TRGM_PENDING_KB})"
    )
    await conn.exec_driver_sql("DROP INDEX IF EXISTS messages_text_trgm")


async def _v21_pg_lz4_texts(conn: AsyncConnection) -> None:
    """PostgreSQL: a message row's long texts (``body_text``, and
    ``parsed`` for a message of many parts: what takes a row past the 2 KB
    at which PostgreSQL compresses it) are compressed with LZ4 instead of
    pglz, for new rows. pglz cost the server
    about 0.2 ms of CPU per 5 KB message of varied words (0.50-0.57 ms
    against 0.28-0.33, 600 inserts, same table size), part of its CPU per
    delivery (issue #20). Where the server was built without LZ4 the
    columns keep pglz. SQLite: nothing (it does not compress)."""
    if conn.dialect.name != "postgresql":
        return
    try:
        async with conn.begin_nested():  # a refusal must not abort the migration
            for col in ("parsed", "body_text"):
                await conn.exec_driver_sql(
                    f"ALTER TABLE messages ALTER COLUMN {col} SET COMPRESSION lz4"
                )
    except DBAPIError as exc:
        log.warning(
            "lz4 unavailable (%s): message texts stay compressed with pglz", str(exc.orig).strip()
        )


async def _v22_pg_commit_marks(conn: AsyncConnection) -> None:
    """PostgreSQL: ``commit_marks``, one row per durable group commit (its
    random token, written in the transaction), so that a writer whose
    COMMIT failed without a verdict can learn whether it committed (see
    ``db.COMMIT_IN_DOUBT_SECONDS``). Rows are kept a few minutes. SQLite:
    nothing (its writer is in the process: no lost reply)."""
    if conn.dialect.name != "postgresql":
        return
    await conn.exec_driver_sql(
        "CREATE TABLE IF NOT EXISTS commit_marks ("
        "token text PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
    )
    await conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS commit_marks_at ON commit_marks (at)")


async def _v23_pg_commit_fences(conn: AsyncConnection) -> None:
    """PostgreSQL: ``commit_marks.fence``, true for the rows a writer in
    doubt inserts to fence a batch off (``db.Database._fence``), so that
    a later try can tell its own fence from the batch's mark. SQLite:
    nothing."""
    if conn.dialect.name != "postgresql":
        return
    await conn.exec_driver_sql(
        "ALTER TABLE commit_marks ADD COLUMN IF NOT EXISTS fence boolean NOT NULL DEFAULT false"
    )


async def _v24_spam_policy(conn: AsyncConnection) -> None:
    """Per-account sender allow and block lists and Junk threshold (issue
    #22): two tables of the mail shard, keyed by account."""
    await conn.run_sync(lambda sync: sender_lists.create(sync, checkfirst=True))
    await conn.run_sync(lambda sync: spam_settings.create(sync, checkfirst=True))


async def _v25_blob_deletions(conn: AsyncConnection) -> None:
    """``blob_deletions``: the blobs garbage collection is deleting, or
    deleted lately, so that a writer naming one stores it again before
    it commits (``storage/blob/deleting.py``)."""
    await conn.run_sync(lambda sync: blob_deletions.create(sync, checkfirst=True))


async def _v26_spam_tokens(conn: AsyncConnection) -> None:
    """The built-in anti-spam engine's per-account Bayes counts and learned
    messages (issue #22): two new tables, nothing rewritten."""
    await conn.run_sync(lambda sync: spam_tokens.create(sync, checkfirst=True))
    await conn.run_sync(lambda sync: spam_learned.create(sync, checkfirst=True))


async def _v27_queue_held_senders(conn: AsyncConnection) -> None:
    """``queue_held_senders``: the accounts held for a sending limit, kept
    beside the queue entries (issue #22) so that every instance and mailctl
    see one flag and a restart keeps it. A new table, nothing rewritten."""
    await conn.run_sync(lambda sync: queue_held_senders.create(sync, checkfirst=True))


async def _v28_save_dates(conn: AsyncConnection) -> None:
    """``mailbox_entries.saved_at``, the RFC 8514 save date of each entry
    (issue #24). Nullable and not filled: an older entry's save date is
    read as its internal date, so the step rewrites no row."""
    await _add_missing_columns(conn, mailbox_entries, ("saved_at",))


async def _v29_metadata(conn: AsyncConnection) -> None:
    """``metadata_entries``, the RFC 5464 METADATA entries of each account
    (issue #24): a new table, nothing rewritten."""
    await conn.run_sync(lambda sync: metadata_entries.create(sync, checkfirst=True))


async def _v30_queue_dsn(conn: AsyncConnection) -> None:
    """RFC 3461 DSN parameters carried with each queued message (RET, ENVID)
    and recipient (NOTIFY, ORCPT), issue #23: nullable columns added, no
    row rewritten (NULL: the parameter was not given)."""
    await _add_missing_columns(conn, queue_messages, ("dsn_ret", "dsn_envid"))
    await _add_missing_columns(conn, queue_recipients, ("dsn_notify", "dsn_orcpt"))


async def _v31_sort_keys(conn: AsyncConnection) -> None:
    """IMAP SORT and THREAD on stored keys (issue #24): the RFC 5256 keys of
    each entry as columns of ``mailbox_entries`` (see the table), filled
    here for the entries already stored (storage.sql.sortkeys.backfill_sync,
    in batches: on 100,000 entries seconds, see bench/README.md), and an
    index (mailbox_id, key, uid) for each common SORT key, so that SORT is
    an ORDER BY read in index order. PostgreSQL indexes a prefix of the
    string keys (storage.sql.sortkeys.PG_PREFIX: a B-tree entry has a size
    limit). SQLite: the indexes' planner statistics, like step 13's."""
    from storage.sortkeys import KEY_COLUMNS
    from storage.sql import sortkeys

    await _add_missing_columns(conn, mailbox_entries, KEY_COLUMNS)
    await conn.run_sync(sortkeys.backfill_sync)
    pg = conn.dialect.name == "postgresql"
    for name in sortkeys.INDEXED:
        col = sortkeys.SORT_COLUMNS[name].name
        expr = col
        if pg and name in sortkeys.PREFIXED:
            expr = f"substring({col} from 1 for {sortkeys.PG_PREFIX})"
        await conn.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS mailbox_entries_by_{name.lower()} "
            f"ON mailbox_entries (mailbox_id, {expr}, uid)"
        )
        if not pg:
            index = f"mailbox_entries_by_{name.lower()}"
            await conn.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE idx = ?", (index,))
            await conn.exec_driver_sql(
                "INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)",
                ("mailbox_entries", index, "1000000 20000 2 1"),
            )
    if not pg:
        await conn.exec_driver_sql("ANALYZE sqlite_schema")


async def _v32_mailbox_acl(conn: AsyncConnection) -> None:
    """``mailbox_acl``, the RFC 4314 rights granted on each mailbox
    (issue #24): a new table, nothing rewritten."""
    await conn.run_sync(lambda sync: mailbox_acl.create(sync, checkfirst=True))


async def _v33_dmarc_reports(conn: AsyncConnection) -> None:
    """``dmarc_reports`` and ``dmarc_report_rows``, the DMARC aggregate
    reports sent to us, and ``dmarc_tally``, what we saw for the reports we
    send (issue #23, RFC 7489 section 7.2): new tables, nothing rewritten."""
    for table in (dmarc_reports, dmarc_report_rows, dmarc_tally):
        await conn.run_sync(lambda sync, t=table: t.create(sync, checkfirst=True))


async def _v34_queue_requiretls(conn: AsyncConnection) -> None:
    """``queue_messages.require_tls``: the RFC 8689 REQUIRETLS flag of each
    queued message (issue #23). A column with a false default: older
    entries were accepted without it, so no row is rewritten."""
    await _add_missing_columns(conn, queue_messages, ("require_tls",))


async def _v35_grantee_metadata(conn: AsyncConnection) -> None:
    """``grantee_metadata``, the RFC 5464 /private entries each grantee
    keeps on a mailbox shared with it (issue #24): a new table, nothing
    rewritten."""
    await conn.run_sync(lambda sync: grantee_metadata.create(sync, checkfirst=True))


async def _v36_queue_tls_report(conn: AsyncConnection) -> None:
    """``queue_messages.tls_report``: the message is a TLS-RPT report of ours
    (RFC 8460 section 3: delivered despite TLS failures, with opportunistic
    TLS, and not counted in the next report). A column with a false
    default: every older entry is ordinary mail, so no row is rewritten."""
    await _add_missing_columns(conn, queue_messages, ("tls_report",))


async def _v37_pg_sort_key_heads(conn: AsyncConnection) -> None:
    """PostgreSQL: the indexed prefixes of the SUBJECT and FROM sort keys
    become stored generated columns (``sort_subject_head``,
    ``sort_from_head``: storage.sql.sortkeys.pg_head), and their indexes
    of step 31 are rebuilt on those columns instead of the expression.
    Why: the planner takes no index-only scan from an expression index
    when the query names the expression's column, so a SORT (SUBJECT)
    read every entry of the mailbox in key order from the table (100,000
    random heap reads, 150-200 ms against 25-50 for DATE's index-only
    scan, issue #24). Generated: every writer (delivery, APPEND, COPY,
    MOVE, the backfill) keeps them without naming them. Adding them
    rewrites ``mailbox_entries`` once (seconds for 100,000 entries, under
    the migration's lock); until autovacuum has visited the rewritten
    table its index-only scans still check the table. SQLite: nothing
    (its indexes hold the whole keys)."""
    if conn.dialect.name != "postgresql":
        return
    from storage.sql import sortkeys

    keys = [sortkeys.SORT_COLUMNS[name] for name in sortkeys.PREFIXED]
    # One ALTER TABLE: one rewrite for both columns.
    await conn.exec_driver_sql(
        "ALTER TABLE mailbox_entries "
        + ", ".join(
            f"ADD COLUMN IF NOT EXISTS {sortkeys.pg_head(key)} bytea GENERATED ALWAYS AS "
            f"(substring({key.name} from 1 for {sortkeys.PG_PREFIX})) STORED"
            for key in keys
        )
    )
    for name, key in zip(sortkeys.PREFIXED, keys, strict=True):
        index = f"mailbox_entries_by_{name.lower()}"
        head = sortkeys.pg_head(key)
        await conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index}")
        await conn.exec_driver_sql(
            f"CREATE INDEX {index} ON mailbox_entries (mailbox_id, {head}, uid)"
        )


async def _v38_pg_sure_words(conn: AsyncConnection) -> None:
    """PostgreSQL: what lets a text search decide most of its candidates
    from their word hashes, without reading their text (issue #20; the
    contract is in ``storage/sql/fts.py`` above HEADER_TAG, the decision
    in ``criteria.pg_sure_condition``). An index on ``search_vocab.hash``
    (a search asks whether another word shares a hash), the hashes kept
    in the row (storage MAIN), and the partial
    index ``messages_search_untagged`` of the rows indexed before this
    step, which the merger's ``fts.index_unindexed`` indexes again in the
    background, a batch at a time: until then such a row is decided by the
    exact test, as every row was before. SQLite: nothing (its own index)."""
    if conn.dialect.name != "postgresql":
        return
    from storage.sql import fts

    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS search_vocab_hash ON search_vocab (hash)"
    )
    # A search now reads each candidate's hashes: kept in the row (MAIN:
    # out of line only for a row that fits no page otherwise). EXTENDED
    # moved them to the TOAST table once the twins took a row past 2 KB,
    # two to three more buffers a candidate. New row versions only; the
    # background pass writes every older row again anyway.
    await conn.exec_driver_sql("ALTER TABLE messages ALTER COLUMN search_words SET STORAGE MAIN")
    await conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS messages_search_untagged ON messages (id) "
        f"WHERE {fts.untagged_predicate()}"
    )


# v39: PostgreSQL indexes no query needs, each one more relation a delivery
# opens (and locks) and, for ``ix_messages_blob_key``, one more insertion
# at a random place of a B-tree of 64-octet keys.
PG_DROPPED_INDEXES = ("mailboxes_account", "ix_messages_blob_key")


async def _v39_pg_fewer_delivery_indexes(conn: AsyncConnection) -> None:
    """PostgreSQL: two indexes that every delivery writes or opens and no
    query needs go (issue #20: the server's CPU per delivery; about a sixth
    of a backend's time per delivery is opening and inserting into the
    indexes of the tables it writes). ``mailboxes_account`` (account_id)
    is the first column of the unique ``mailboxes_account_name`` (account_id,
    name), which serves every lookup by account, and by account and name
    without a filter (the delivery's mailbox lock took the one-column index
    plus a filter on the name). ``ix_messages_blob_key`` served only the
    garbage collector's list of referenced blobs (``referenced_blobs``: every
    key of the shard, a scan of the table either way, rare and in the
    background); no request looks a message up by its blob. SQLite keeps
    both (its planner statistics of step 13 name them; its writes are not
    what issue #20 measures)."""
    if conn.dialect.name != "postgresql":
        return
    for index in PG_DROPPED_INDEXES:
        await conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index}")


MIGRATIONS: list[Step] = [
    _v1_tables,
    _v2_full_text,
    _v3_account_indexes,
    _v4_outbound_queue,
    _v5_fts_without_positions,
    _v6_fts_apart,
    _v7_blob_pack,
    _v8_ids_never_reused,
    _v9_subscriptions,
    _v10_account_moves,
    _v11_list_order,
    _v12_shared_secrets,
    _v13_sqlite_planner_stats,
    _v14_pg_trigram_search,
    _v15_dkim_keys,
    _v16_snapshot_indexes,
    _v17_pg_search_index_deferred,
    _v18_pg_blob_pack,
    _v19_subject_index,
    _v20_pg_word_index,
    _v21_pg_lz4_texts,
    _v22_pg_commit_marks,
    _v23_pg_commit_fences,
    _v24_spam_policy,
    _v25_blob_deletions,
    _v26_spam_tokens,
    _v27_queue_held_senders,
    _v28_save_dates,
    _v29_metadata,
    _v30_queue_dsn,
    _v31_sort_keys,
    _v32_mailbox_acl,
    _v33_dmarc_reports,
    _v34_queue_requiretls,
    _v35_grantee_metadata,
    _v36_queue_tls_report,
    _v37_pg_sort_key_heads,
    _v38_pg_sure_words,
    _v39_pg_fewer_delivery_indexes,
]
"""Step ``i`` brings the schema to version ``i + 1``. Append only."""

SCHEMA_VERSION = len(MIGRATIONS)


async def current_version(conn: AsyncConnection) -> int:
    """The applied schema version, 0 for an empty database."""
    has_table = await conn.run_sync(lambda sync: sync.dialect.has_table(sync, "schema_version"))
    if not has_table:
        return 0
    result = await conn.execute(select(schema_version.c.version))
    return max((row[0] for row in result), default=0)


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


async def apply_step(conn: AsyncConnection, version: int) -> bool:
    """Applies migration ``version`` (1-based) inside the caller's transaction,
    unless another process already did. True if applied here."""
    if version == 1:
        await conn.run_sync(lambda sync: schema_version.create(sync, checkfirst=True))
    if await current_version(conn) >= version:
        return False
    await MIGRATIONS[version - 1](conn)
    await conn.execute(schema_version.insert().values(version=version, applied_at=_now()))
    return True


PG_MIGRATION_LOCK = 7_402_511  # pg_advisory_xact_lock key shared by every shardmail process


async def lock_for_migration(conn: AsyncConnection) -> None:
    """Serialises concurrent migrators (several daemons starting at once)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})"))
