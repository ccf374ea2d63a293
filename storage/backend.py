"""Opening the whole data plane: ``open_storage(settings) -> Storage``.

Roles (DESIGN.md "Scale-out"): the main URL is the directory database
(domains, accounts, aliases, the account -> shard map). It is also shard
"default" (the outbound queue and the mailboxes of accounts placed there)
unless a shard named "default" names another database; every shard is a
database with the same schema. Migrations run at open, on every database.
An unreachable shard fails only the calls for its accounts; an unreachable
directory fails logins and routing everywhere, as TEMPORARY errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from sqlalchemy import make_url

from storage import errors
from storage.blob import open_blob_store
from storage.blob.fs import FsBlobStore
from storage.blob.gc import collect
from storage.blob.skeleton import DEFAULT_ATTACHMENT_MIN_BYTES, SkeletonBlobStore
from storage.events import (
    EventBusImpl,
    InProcessEventBus,
    LocalSocketEventBus,
    PgNotifyEventBus,
    RedisEventBus,
)
from storage.model import Account
from storage.queue import PartitionedQueue
from storage.sql.db import Database
from storage.sql.directory import SqlDirectory
from storage.sql.mailstore import SqlMailStore
from storage.sql.queue import OutboundQueue

if TYPE_CHECKING:
    from conf.settings import StorageSettings

log = logging.getLogger(__name__)

DEFAULT_SHARD = "default"
# How often a shard that could not be migrated at open (it was down) is
# tried again in the background.
SHARD_RETRY_SECONDS = 2.0


@dataclass(frozen=True)
class ShardSpec:
    """One mail shard: its database ``url``, the ``replicas`` that may be
    promoted in its place (PostgreSQL URLs; see :func:`failover_url`), its
    placement ``weight`` (0: no new accounts) and its ``blob_dir`` (a
    folder or an ``s3://`` URL; empty: the site's blob store)."""

    url: str
    replicas: tuple[str, ...] = ()
    weight: float = 1.0
    blob_dir: str = ""


def failover_url(url: str, replicas: Sequence[str]) -> str:
    """``url`` with each replica's host:port added as a further host and
    ``target_session_attrs=read-write`` (libpq's multi-host form, which
    asyncpg and SQLAlchemy's asyncpg dialect take as ``?host=h:p&host=...``):
    each new connection goes to whichever host is the primary now, so after
    a promotion the pool reconnects there without a restart. Unchanged
    without replicas."""
    if not replicas:
        return url
    parsed = make_url(url)
    hosts = list(_hosts(parsed))
    for replica in replicas:
        hosts += [h for h in _hosts(make_url(replica)) if h not in hosts]
    query = {k: v for k, v in parsed.query.items() if k != "host"}
    query["host"] = tuple(hosts)
    query.setdefault("target_session_attrs", "read-write")
    return parsed.set(host=None, port=None, query=query).render_as_string(hide_password=False)


def _hosts(url: Any) -> tuple[str, ...]:
    """The ``host:port`` entries of a PostgreSQL URL, in either form."""
    listed = url.query.get("host")
    if listed:
        return (listed,) if isinstance(listed, str) else tuple(listed)
    return (f"{url.host or '127.0.0.1'}:{url.port or 5432}",)


class _ShardRouter:
    """A mail store for an account whose shard is not cached yet: each call
    first asks the directory (an account created by another instance)."""

    def __init__(self, storage: SqlStorage, account_id: int) -> None:
        self._storage = storage
        self._account_id = account_id

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            account = await self._storage.directory.get_account_by_id(self._account_id)
            store = self._storage.mail(account)
            return await getattr(store, name)(*args, **kwargs)

        return call


class SqlStorage:
    """The :class:`storage.api.Storage` over SQL shards and a blob store.

    Extra attributes beyond the protocol: ``queue`` (the outbound queue: a
    partition in every shard, ``storage.queue``), ``stores`` (shard name ->
    mail store) and
    ``databases`` (shard name -> database; the directory's is
    ``directory.db``, the same object as shard "default"'s unless that
    shard was given a database of its own).

    ``blobs`` is the site's blob store: the outbound queue's, and every
    shard's not given one of its own in ``shard_blobs`` (shard name -> blob
    store); a shard's messages are read from ``blobs_for(account)``.
    """

    def __init__(
        self,
        databases: dict[str, Database],
        blobs: FsBlobStore,
        hasher: PasswordHasher | None = None,
        events: EventBusImpl | None = None,
        *,
        directory_db: Database | None = None,
        weights: Mapping[str, float] | None = None,
        shard_blobs: Mapping[str, FsBlobStore] | None = None,
    ) -> None:
        self.databases = databases
        self._retries: list[asyncio.Task[None]] = []  # shards down at open (migrate)
        self.blobs = blobs
        self.events = events or InProcessEventBus()
        own = shard_blobs or {}
        self.stores: dict[str, SqlMailStore] = {
            name: SqlMailStore(db, self.events, own.get(name, blobs), shard=name)
            for name, db in databases.items()
        }
        self.directory = SqlDirectory(
            directory_db or databases[DEFAULT_SHARD],
            self._store,
            list(databases),
            hasher=hasher,
            weights=weights,
            events=self.events,
        )
        # Every mail shard holds a partition of the outbound queue (issue #19);
        # a shard of weight 0 is being retired: its partition takes no new mail.
        self.queue = PartitionedQueue(
            {name: OutboundQueue(db, partition=name) for name, db in databases.items()},
            closed=[name for name, weight in (weights or {}).items() if weight == 0],
        )

    def _all_databases(self) -> list[Database]:
        """The directory's database and every shard's, each once."""
        found = [self.directory.db]
        found += [db for db in self.databases.values() if all(db is not f for f in found)]
        return found

    def all_databases(self) -> list[Database]:
        """The directory's database and every shard's, each once: where
        garbage collection records the blobs it deletes
        (``storage/blob/deleting.py``)."""
        return self._all_databases()

    def _store(self, shard: str) -> SqlMailStore:
        try:
            return self.stores[shard]
        except KeyError:
            raise errors.StorageError(
                errors.ErrorKind.TEMPORARY, f"shard {shard!r} is not configured here"
            ) from None

    def mail(self, account: Account | int) -> SqlMailStore:
        """The mail store of the account's shard (no I/O).

        The cached route wins over ``account.shard``: an Account read before
        the account moved (a session's, a cached RCPT route's) still reaches
        the shard it is on now, once this instance has heard of the move."""
        if len(self.stores) == 1:
            return self.stores[DEFAULT_SHARD]
        if isinstance(account, Account):
            shard = self.directory.shard_cache.get(account.id)
            if shard is None:
                shard = self.directory.remember_shard(account.id, account.shard)
            return self._store(shard)
        shard = self.directory.shard_cache.get(account)
        if shard is None:
            return _ShardRouter(self, account)  # type: ignore[return-value]
        return self._store(shard)

    def blobs_for(self, account: Account) -> FsBlobStore:
        """The blob store of the account's shard, routed as :meth:`mail`:
        where its messages' raw bytes are read and new ones written."""
        return self.mail(account).blobs or self.blobs  # type: ignore[return-value]

    def blob_stores(self) -> list[FsBlobStore]:
        """Every distinct blob store, whatever its kind (a folder, an S3
        bucket): the site's first, then the shards' own. Garbage collection
        passes over each (``storage/blob/gc.py``)."""
        found: list[FsBlobStore] = [self.blobs]
        for store in self.stores.values():
            blobs = store.blobs
            if blobs is not None and all(blobs is not f for f in found):
                found.append(blobs)
        return found

    @property
    def shards(self) -> Sequence[str]:
        return list(self.databases)

    async def migrate(self) -> None:
        """Migrates the directory (it must answer: without it nothing can be
        served), then every shard. A shard that is down now (TEMPORARY) is
        logged and migrated in the background once it answers, so that its
        outage fails its own accounts' calls (TEMPORARY), not the start."""
        await self.directory.db.migrate()
        shards = [db for db in self._all_databases() if db is not self.directory.db]
        results = await asyncio.gather(*(db.migrate() for db in shards), return_exceptions=True)
        for db, result in zip(shards, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if not isinstance(result, errors.StorageError) or (
                result.kind is not errors.ErrorKind.TEMPORARY
            ):
                raise result
            log.warning("shard %s is down, serving the others: %s", db.safe_url, result)
            self._retries.append(asyncio.create_task(self._migrate_when_back(db)))

    async def _migrate_when_back(self, db: Database) -> None:
        while True:
            await asyncio.sleep(SHARD_RETRY_SECONDS)
            try:
                await db.migrate()
            except errors.StorageError as exc:
                if exc.kind is not errors.ErrorKind.TEMPORARY:
                    log.error("shard %s cannot be migrated: %s", db.safe_url, exc)
                    return
                continue
            log.info("shard %s is back", db.safe_url)
            return

    async def row_blobs(self, blobs: FsBlobStore) -> set[str]:
        """The keys that rows kept in ``blobs`` name: messages of every
        shard whose blob store it is, and the outbound queue's for the
        site's store."""
        referenced: set[str] = set()
        for store in self.stores.values():
            if store.blobs is blobs:
                referenced |= await store.referenced_blobs()
        if blobs is self.blobs:
            referenced |= await self.queue.referenced_blobs()
        return referenced

    async def referenced_blobs(self, blobs: FsBlobStore, *, missing_ok: bool = False) -> set[str]:
        """:meth:`row_blobs` and the attachment blobs their skeletons refer
        to (``storage/blob/skeleton.py``): what garbage collection keeps.
        A blob a row names that reads as missing is TEMPORARY (garbage
        collection then deletes nothing), or with ``missing_ok`` (counts)
        refers to nothing."""
        referenced = await self.row_blobs(blobs)
        references = getattr(blobs, "references", None)
        if references is not None:
            parts: set[str] = set()
            for key in referenced:
                try:
                    parts |= await references(key)
                except errors.StorageError as err:
                    # Unsure what it refers to (a read that failed, or a
                    # store that answered "missing" for a blob a row names,
                    # lost or not): delete nothing. `mailctl blobs verify`
                    # names a blob that is really lost.
                    if err.kind is errors.ErrorKind.NOT_FOUND and missing_ok:
                        continue
                    if err.kind is errors.ErrorKind.NOT_FOUND:
                        raise errors.StorageError(
                            errors.ErrorKind.TEMPORARY,
                            f"blob {key} that a row names reads as missing; "
                            "garbage collection deletes nothing until it reads",
                        ) from err
                    raise
            referenced |= parts
        return referenced

    async def collect_garbage(self, min_age_seconds: float = 3600.0) -> int:
        """Deletes blobs no shard refers to and stored longer than
        ``min_age_seconds`` ago (younger ones may belong to an ingest in
        progress), in every blob store; returns the count. The caller holds
        the GC lease (``storage/blob/gc.py``, which explains the order that
        keeps a concurrent ingest's blobs)."""
        return (await collect(self, min_age_seconds)).removed

    async def close(self) -> None:
        for task in self._retries:
            task.cancel()
        await self.events.close()
        for db in self._all_databases():
            await db.close()
        for blobs in self.blob_stores():
            await blobs.close()


# Blobs up to this size are packed by default: most mail without
# attachments, and a database reads blobs this small about as fast as the
# filesystem does.
DEFAULT_BLOB_PACK_MAX_BYTES = 256 * 1024


async def open_storage_from_url(
    url: str,
    blob_dir: Path | str,
    shards: Mapping[str, str | ShardSpec] | None = None,
    *,
    password_hasher: PasswordHasher | None = None,
    events: str = "auto",
    redis_url: str = "",
    fts_indexer: bool = True,
    blob_pack_max_bytes: int | None = None,
    attachment_min_bytes: int = DEFAULT_ATTACHMENT_MIN_BYTES,
) -> SqlStorage:
    """Opens (and migrates) storage at ``url`` with blobs under ``blob_dir``.

    ``url`` is the directory's database, and shard "default" unless
    ``shards`` names one; ``shards``: name -> URL or :class:`ShardSpec`.
    ``password_hasher`` lets tests use cheap argon2 parameters
    (``PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)``).
    ``events``: "auto" carries changes between instances with PostgreSQL
    LISTEN/NOTIFY when the main database is PostgreSQL, and between the
    processes of this host with Unix datagram sockets in ``<file>-events/``
    beside a SQLite file; "redis" with Redis pub/sub at ``redis_url``
    (INVALID without one); "inprocess" forces the in-process bus.
    ``fts_indexer``: start each SQLite database's background full-text
    indexer (``storage/sql/fts.py``); tests that drive it themselves say
    False (``Database.indexer().run_once()``).
    ``blob_pack_max_bytes``: blobs up to this size are packed
    (``storage/blob/pack.py``); None picks
    :data:`DEFAULT_BLOB_PACK_MAX_BYTES`. The pack is a table in the
    default shard's database (a SQLite file or PostgreSQL): a delivery to
    that shard writes its blob in its own transaction, one fsync for both
    (``MailStore.deliver``'s ``blob_data``). Otherwise (no SQLite file)
    it is ``pack.sqlite`` in the blob folder; over PostgreSQL nothing is
    packed but deliveries' blobs, the folder may be shared over NFS,
    where SQLite's locks are not to be trusted.
    ``attachment_min_bytes``: MIME leaf parts longer than this are stored
    once, as blobs of their own (``storage/blob/skeleton.py``); 0: never.
    """
    if events not in ("auto", "inprocess", "redis"):
        raise errors.invalid(f"unknown event bus {events!r}")
    if events == "redis" and not redis_url:
        raise errors.invalid('events "redis" needs a Redis URL')
    specs = {n: ShardSpec(s) if isinstance(s, str) else s for n, s in (shards or {}).items()}
    directory_db = Database(url)
    databases: dict[str, Database] = {}
    if DEFAULT_SHARD not in specs:
        databases[DEFAULT_SHARD] = directory_db
    for name, spec in specs.items():
        same = spec.url == url and not spec.replicas  # one database, one engine
        databases[name] = directory_db if same else Database(failover_url(spec.url, spec.replicas))
    databases = {DEFAULT_SHARD: databases.pop(DEFAULT_SHARD), **databases}
    weights = {name: spec.weight for name, spec in specs.items()}
    # The events ride on the directory's database: every instance reaches it.
    bus: EventBusImpl | None = None
    if events == "redis":
        bus = RedisEventBus(redis_url)
    elif events == "auto" and directory_db.dialect == "postgresql":
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        bus = PgNotifyEventBus(dsn)
    elif events == "auto" and directory_db.dialect == "sqlite":
        events_dir = sqlite_events_dir(url)
        if events_dir is not None:
            bus = LocalSocketEventBus(events_dir)
    if blob_pack_max_bytes is None:
        blob_pack_max_bytes = DEFAULT_BLOB_PACK_MAX_BYTES
    # Set even with packing off, so blobs packed there before stay readable.
    pack_path = databases[DEFAULT_SHARD].file
    blobs = open_blob_store(
        blob_dir,
        pack_max_bytes=blob_pack_max_bytes,
        pack_path=pack_path,
        pack_db=_table_pack_db(databases[DEFAULT_SHARD]),
    )
    shard_blobs = _shard_blob_stores(specs, databases, blob_dir, blob_pack_max_bytes, pack_path)
    if attachment_min_bytes > 0:
        blobs = SkeletonBlobStore(blobs, attachment_min_bytes)  # type: ignore[assignment]
        wrapped = {id(b): SkeletonBlobStore(b, attachment_min_bytes) for b in shard_blobs.values()}
        shard_blobs = {n: wrapped[id(b)] for n, b in shard_blobs.items()}  # type: ignore[misc]
    storage = SqlStorage(
        databases,
        blobs,
        hasher=password_hasher,
        events=bus,
        directory_db=directory_db,
        weights=weights,
        shard_blobs=shard_blobs,
    )
    try:
        if isinstance(bus, PgNotifyEventBus | LocalSocketEventBus | RedisEventBus):
            await bus.start()
        await storage.migrate()
        if fts_indexer:
            for db in {id(db): db for db in databases.values()}.values():
                db.start_indexer()
        for store in storage.blob_stores():
            moved = await asyncio.to_thread(store.migrate_layout)
            if moved:
                log.info("moved %d blobs to the one-level layout in %s", moved, store.root)
        await storage.directory.load_shard_map()
    except BaseException:
        await storage.close()
        raise
    return storage


def _shard_blob_stores(
    specs: Mapping[str, ShardSpec],
    databases: Mapping[str, Database],
    blob_dir: Path | str,
    pack_max_bytes: int,
    site_pack: str | None,
) -> dict[str, FsBlobStore]:
    """The blob stores of shards with a ``blob_dir`` of their own, a folder
    or an ``s3://`` URL (one store per location, shared by shards naming
    the same one). A shard whose database is a SQLite file of its own packs
    small blobs there, as the default shard does; otherwise in its
    folder's ``pack.sqlite`` (nothing is packed in S3)."""

    def where(location: Path | str) -> Path | str:
        text = str(location)
        return text if text.startswith("s3://") else Path(text).absolute()

    site = where(blob_dir)
    by_dir: dict[Path | str, FsBlobStore] = {}
    found: dict[str, FsBlobStore] = {}
    for name, spec in specs.items():
        if not spec.blob_dir or where(spec.blob_dir) == site:
            continue
        folder = where(spec.blob_dir)
        if folder not in by_dir:
            file = databases[name].file
            pack = file if file is not None and file != site_pack else None
            by_dir[folder] = open_blob_store(
                folder,
                pack_max_bytes=pack_max_bytes,
                pack_path=pack,
                pack_db=_table_pack_db(databases[name]),
            )
        found[name] = by_dir[folder]
    return found


def _table_pack_db(db: Database) -> Database | None:
    """The database whose ``blobs`` table a blob store packs deliveries'
    small blobs in, when that is PostgreSQL (schema step 18); None for SQLite,
    whose pack is its file (``pack_path``)."""
    return None if db.is_sqlite else db


def sqlite_events_dir(url: str) -> Path | None:
    """Where the processes sharing the SQLite file at ``url`` bind their
    event sockets: ``<file>-events`` beside it (like ``-wal`` and
    ``-writers``, so two databases in one directory never cross-talk).
    None for an in-memory database."""
    parsed = make_url(url)
    path = parsed.database
    if not path or path == ":memory:" or parsed.query.get("mode") == "memory":
        return None
    return Path(path).absolute().parent / f"{Path(path).name}-events"


async def open_storage(
    settings: StorageSettings,
    *,
    data_dir: Path | str | None = None,
    password_hasher: PasswordHasher | None = None,
    redis_url: str = "",
) -> SqlStorage:
    """Opens the storage that ``settings`` describe and runs migrations.

    ``redis_url`` (``[redis] url``) carries the events when
    ``settings.events`` is "redis".

    An empty ``url`` or ``blob_dir`` means "inside ``data_dir``" (a SQLite
    file ``shardmail.db`` and ``blobs/``); INVALID if neither is given.
    """
    url, blob_dir = settings.url, settings.blob_dir
    if not url or not blob_dir:
        if data_dir is None:
            raise errors.invalid("storage url and blob_dir need a data_dir default")
        base = Path(data_dir)
        await asyncio.to_thread(base.mkdir, mode=0o700, parents=True, exist_ok=True)
        url = url or f"sqlite+aiosqlite:///{(base / 'shardmail.db').resolve()}"
        blob_dir = blob_dir or str(base / "blobs")
    shards = {
        name: ShardSpec(shard.url, tuple(shard.replicas), shard.weight, shard.blob_dir)
        for name, shard in settings.shards.items()
    }
    return await open_storage_from_url(
        url,
        blob_dir,
        shards,
        password_hasher=password_hasher,
        events=settings.events,
        redis_url=redis_url,
        blob_pack_max_bytes=(
            None if settings.blob_pack_max_bytes == "auto" else settings.blob_pack_max_bytes
        ),
        attachment_min_bytes=settings.attachment_min_bytes,
    )
