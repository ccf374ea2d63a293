"""The SQL directory: domains, accounts, aliases and the account -> shard map.

It lives in the directory's database (``[storage] url``; on the embedded
default the one SQLite file, which is also shard "default"). Passwords are
hashed with argon2id (argon2-cffi) in a worker thread; authentication of an
unknown login verifies against a dummy hash so both answers take the same
time.

Routes (:meth:`SqlDirectory.resolve`, asked on every SMTP RCPT) are cached
for ``ROUTE_CACHE_SECONDS``: a write through this directory forgets them at
once, a change made by another instance (``mailctl`` in its own process,
another mtad) is seen at most that many seconds late, for a new account as
for a removed one. An account's shard is cached apart (``shard_cache``);
when it changes every instance hears of it through the event bus
(:meth:`SqlDirectory.set_shard`).

Placement: a new account goes to the shard with the fewest accounts per
unit of weight (counts re-read at most every ``PLACEMENT_COUNT_SECONDS``),
so shards fill in proportion to their weights; weight 0 takes none.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import Argon2Error, InvalidHashError
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from storage import errors
from storage.api import Route
from storage.authcache import AuthCache
from storage.model import Account, Alias, Domain
from storage.sodium_argon2 import SodiumPasswordHasher
from storage.sql.db import Database
from storage.sql.mailstore import SqlMailStore
from storage.sql.schema import accounts, aliases, dkim_keys, domains, shared_secrets

MAX_ADDRESS = 254  # RFC 5321 section 4.5.3.1.3 path limit, less the brackets
MAX_LOCAL_PART = 64  # RFC 5321 section 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 section 4.5.3.1.2
MAX_ALIAS_DEPTH = 8  # alias -> alias chains are followed this far
PLUS_SEPARATOR = "+"
ROUTE_CACHE_SECONDS = 2.0  # how late another instance's directory change may be seen
ROUTE_CACHE_SIZE = 10_000  # addresses; the cache starts over when full
# How old the per-shard account counts placement weighs may be: other
# instances' new accounts are counted this late (this one's at once).
PLACEMENT_COUNT_SECONDS = 30.0

log = logging.getLogger("storage.directory")

# Runs one CPU-heavy password check and gives its result (see authenticate).
CheckRunner = Callable[[Callable[[], Any]], Awaitable[Any]]


def normalize_domain(name: str) -> str:
    """Lower-case IDNA A-label form; INVALID if malformed."""
    name = name.strip().rstrip(".").lower()
    if not name or len(name) > MAX_DOMAIN or any(c.isspace() or c in "@/\\" for c in name):
        raise errors.invalid("bad domain name")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise errors.invalid("bad domain name") from None
    if any(not label or len(label) > 63 for label in name.split(".")):
        raise errors.invalid("bad domain name")
    return name


def normalize_address(address: str) -> str:
    """``local@domain`` lower-cased, angle brackets stripped; INVALID if malformed."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at or not local or len(local) > MAX_LOCAL_PART or len(address) > MAX_ADDRESS:
        raise errors.invalid("bad address")
    if any(c.isspace() or ord(c) < 32 for c in local):
        raise errors.invalid("bad address")
    return f"{local.lower()}@{normalize_domain(domain)}"


def password_hasher(auth: Any) -> PasswordHasher:
    """The argon2id hasher of the ``[auth]`` settings (``argon2_time_cost``,
    ``argon2_memory_kib``, ``argon2_parallelism``); it verifies through
    libsodium (:mod:`storage.sodium_argon2`)."""
    return SodiumPasswordHasher(
        time_cost=auth.argon2_time_cost,
        memory_cost=auth.argon2_memory_kib,
        parallelism=auth.argon2_parallelism,
    )


def _account(row: Any) -> Account:
    return Account(
        id=row.id,
        address=row.address,
        password_hash=row.password_hash,
        shard=row.shard,
        quota_bytes=row.quota_bytes,
        created=dt.datetime.fromtimestamp(row.created, dt.UTC),
    )


class SqlDirectory:
    """A :class:`storage.api.Directory` over the directory's database.

    ``mail_store_for(shard)`` gives the mail store where an account's
    mailboxes live; ``shard_cache`` is kept up to date with every account
    this directory sees, so ``Storage.mail(account_id)`` needs no I/O.
    ``weights``: shard -> placement weight (1 if absent). ``events``: the
    bus that carries route changes between instances (``publish_route``,
    ``watch_routes``, see ``storage/events.py``).
    """

    def __init__(
        self,
        db: Database,
        mail_store_for: Callable[[str], SqlMailStore],
        shard_names: list[str],
        hasher: PasswordHasher | None = None,
        shard_cache: dict[int, str] | None = None,
        *,
        weights: Mapping[str, float] | None = None,
        events: Any = None,
    ) -> None:
        self.db = db
        self._mail_store_for = mail_store_for
        self._shards = shard_names
        self.weights = {name: (weights or {}).get(name, 1.0) for name in shard_names}
        self.hasher = hasher or PasswordHasher()
        self.shard_cache: dict[int, str] = shard_cache if shard_cache is not None else {}
        self._dummy_hash: str | None = None
        # address as asked -> (monotonic expiry, route); the generation makes
        # a lookup that overlapped a local write drop its (maybe stale) answer.
        self._routes: dict[str, tuple[float, Route]] = {}
        self._routes_generation = 0
        # Bumped by every route change heard: a read of the accounts table
        # that overlapped one does not put its (maybe stale) shard in the cache.
        self._shard_epoch = 0
        # shard -> accounts, as of the monotonic time _sizes_read (placement).
        self._sizes: dict[str, int] = {}
        self._sizes_read = -PLACEMENT_COUNT_SECONDS
        self._events = events
        if events is not None and hasattr(events, "watch_routes"):
            events.watch_routes(self._route_changed)

    # --- the account -> shard cache -------------------------------------------

    def remember_shard(self, account_id: int, shard: str) -> str:
        """Caches ``shard`` as the account's (what a read of its row found);
        returns it."""
        self.shard_cache[account_id] = shard
        return shard

    def _remember(self, rows: Iterable[Any], epoch: int) -> None:
        """Caches the shard of each account row read since ``epoch``, unless
        a route change was heard meanwhile (the row may predate it)."""
        if epoch == self._shard_epoch:
            self.shard_cache.update((r.id, r.shard) for r in rows)

    def _route_changed(self, account_id: int | None, shard: str | None) -> None:
        """The event bus's route watcher: the account is on ``shard`` now
        (None: changes may have been missed, forget every route)."""
        self._shard_epoch += 1
        if account_id is None or shard is None:
            self.shard_cache.clear()
        else:
            self.shard_cache[account_id] = shard
        self._routes.clear()
        self._routes_generation += 1

    @property
    def generation(self) -> int:
        """Bumped by every write through this directory (a password, a
        quota, a removal, a move) and every route change heard on the event
        bus: what a caller cached from accounts read before it changed must
        be read again. Changes made by other processes do not bump it."""
        return self._routes_generation

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[Any]:
        """``db.write()`` for anything routing depends on: cached routes are
        forgotten once it ends (committed or not)."""
        try:
            async with self.db.write() as conn:
                yield conn
        finally:
            self._routes.clear()
            self._routes_generation += 1

    # --- domains -------------------------------------------------------------

    async def add_domain(self, name: str) -> Domain:
        """EXISTS if present."""
        name = normalize_domain(name)
        async with self._write() as conn:
            try:
                async with conn.begin_nested():
                    result = await conn.execute(insert(domains).values(name=name))
            except IntegrityError:
                raise errors.exists("domain exists") from None
            return Domain(int(result.inserted_primary_key[0]), name)

    async def list_domains(self) -> list[Domain]:
        async with self.db.read() as conn:
            rows = await conn.execute(select(domains).order_by(domains.c.name))
            return [Domain(r.id, r.name) for r in rows]

    async def remove_domain(self, name: str) -> None:
        """INVALID while accounts or aliases of the domain exist; NOT_FOUND if absent."""
        name = normalize_domain(name)
        async with self._write() as conn:
            row = (await conn.execute(select(domains).where(domains.c.name == name))).first()
            if row is None:
                raise errors.not_found("no such domain")
            used = (
                await conn.execute(
                    select(func.count()).select_from(accounts).where(accounts.c.domain_id == row.id)
                )
            ).scalar()
            suffix = "@" + name
            used_alias = (
                await conn.execute(
                    select(func.count())
                    .select_from(aliases)
                    .where(aliases.c.source.endswith(suffix, autoescape=True))
                )
            ).scalar()
            if used or used_alias:
                raise errors.invalid("domain still has accounts or aliases")
            await conn.execute(delete(domains).where(domains.c.id == row.id))

    async def is_local_domain(self, name: str) -> bool:
        try:
            name = normalize_domain(name)
        except errors.StorageError:
            return False
        async with self.db.read() as conn:
            row = (await conn.execute(select(domains.c.id).where(domains.c.name == name))).first()
            return row is not None

    # --- accounts --------------------------------------------------------------

    async def _hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def add_account(
        self, address: str, password: str, quota_bytes: int | None = None, shard: str | None = None
    ) -> Account:
        """Creates the account and its default mailboxes in ``shard`` (if
        None, the one placement picks: see :meth:`place`). NOT_FOUND for an
        unknown domain, EXISTS if taken, INVALID for an unknown shard."""
        address = normalize_address(address)
        if shard is not None and shard not in self._shards:
            raise errors.invalid(f"no such shard {shard!r}")
        if quota_bytes is not None and quota_bytes < 0:
            raise errors.invalid("quota must not be negative")
        password_hash = await self._hash(password)
        domain = address.rpartition("@")[2]
        shard = shard or await self.place()
        async with self._write() as conn:
            dom = (await conn.execute(select(domains.c.id).where(domains.c.name == domain))).first()
            if dom is None:
                raise errors.not_found("no such domain")
            try:
                async with conn.begin_nested():
                    result = await conn.execute(
                        insert(accounts).values(
                            address=address,
                            domain_id=dom.id,
                            password_hash=password_hash,
                            shard=shard,
                            quota_bytes=quota_bytes,
                            created=time.time(),
                        )
                    )
            except IntegrityError:
                raise errors.exists("account exists") from None
            account_id = int(result.inserted_primary_key[0])
            row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).one()
        account = _account(row)
        store = self._mail_store_for(shard)
        try:
            await store.init_account(account.id, quota_bytes)
            await store.create_default_mailboxes(account.id)
        except BaseException:
            # The shard may be another database: undo the directory row by hand.
            async with self._write() as conn:
                await conn.execute(delete(accounts).where(accounts.c.id == account.id))
            raise
        self.shard_cache[account.id] = shard
        self._sizes[shard] = self._sizes.get(shard, 0) + 1
        return account

    async def place(self) -> str:
        """The shard for a new account: among shards of weight > 0, the one
        with the fewest accounts per unit of weight (ties: the first
        configured). INVALID if every weight is 0."""
        open_shards = [name for name in self._shards if self.weights[name] > 0]
        if not open_shards:
            raise errors.invalid("no shard takes new accounts (every shard has weight 0)")
        sizes = await self.shard_sizes(max_age=PLACEMENT_COUNT_SECONDS)
        return min(open_shards, key=lambda name: sizes.get(name, 0) / self.weights[name])

    async def shard_sizes(self, max_age: float = 0.0) -> dict[str, int]:
        """Accounts per shard (every configured shard, 0 if none), read
        again if the last count is older than ``max_age`` seconds."""
        if time.monotonic() - self._sizes_read >= max_age:
            async with self.db.read() as conn:
                rows = await conn.execute(
                    select(accounts.c.shard, func.count()).group_by(accounts.c.shard)
                )
                self._sizes = {shard: int(count) for shard, count in rows}
            self._sizes_read = time.monotonic()
        return {name: self._sizes.get(name, 0) for name in self._shards}

    async def get_account(self, address: str) -> Account:
        """By exact address, case-insensitive. NOT_FOUND if none."""
        try:
            address = normalize_address(address)
        except errors.StorageError:
            raise errors.not_found("no such account") from None
        epoch = self._shard_epoch
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(accounts).where(accounts.c.address == address))
            ).first()
        if row is None:
            raise errors.not_found("no such account")
        self._remember([row], epoch)
        return _account(row)

    async def get_account_by_id(self, account_id: int) -> Account:
        epoch = self._shard_epoch
        async with self.db.read() as conn:
            row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).first()
        if row is None:
            raise errors.not_found("no such account")
        self._remember([row], epoch)
        return _account(row)

    async def list_accounts(self, domain: str | None = None) -> list[Account]:
        stmt = select(accounts).order_by(accounts.c.address)
        if domain is not None:
            stmt = stmt.join(domains, domains.c.id == accounts.c.domain_id).where(
                domains.c.name == normalize_domain(domain)
            )
        epoch = self._shard_epoch
        async with self.db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        self._remember(rows, epoch)
        return [_account(r) for r in rows]

    async def load_shard_map(self) -> dict[int, str]:
        """Refreshes the whole account -> shard cache (at open)."""
        epoch = self._shard_epoch
        async with self.db.read() as conn:
            rows = (await conn.execute(select(accounts.c.id, accounts.c.shard))).all()
        self._remember(rows, epoch)
        return self.shard_cache

    async def set_password(self, address: str, password: str) -> None:
        account = await self.get_account(address)
        password_hash = await self._hash(password)
        async with self._write() as conn:
            await conn.execute(
                update(accounts)
                .where(accounts.c.id == account.id)
                .values(password_hash=password_hash)
            )

    async def set_quota(self, address: str, quota_bytes: int | None) -> None:
        if quota_bytes is not None and quota_bytes < 0:
            raise errors.invalid("quota must not be negative")
        account = await self.get_account(address)
        async with self._write() as conn:
            await conn.execute(
                update(accounts).where(accounts.c.id == account.id).values(quota_bytes=quota_bytes)
            )
        await self._mail_store_for(account.shard).set_quota(account.id, quota_bytes)

    async def set_shard(self, address: str, shard: str) -> None:
        """Points the account at another shard (the flip of a move; copying
        its mail there first is the caller's job). INVALID for an unknown
        shard, NOT_FOUND for an unknown account.

        Guarantees: once it returns, the directory row names ``shard``
        (committed), this instance routes the account there (``Storage.mail``
        by id or by any Account, cached RCPT routes), and the route change
        has been published on the event bus, where every other instance
        drops its cached route within its bus's latency (LISTEN/NOTIFY,
        local sockets). The bus is best effort: an instance whose listener
        was disconnected forgets every cached route when it reconnects, but
        one whose datagram queue was full (SQLite, one host) keeps the old
        route: what it finds on the old shard must then answer "try again"
        (a mover's fence), never "no such mailbox"."""
        if shard not in self._shards:
            raise errors.invalid(f"no such shard {shard!r}")
        account = await self.get_account(address)
        async with self._write() as conn:
            await conn.execute(
                update(accounts).where(accounts.c.id == account.id).values(shard=shard)
            )
        self._sizes[account.shard] = max(0, self._sizes.get(account.shard, 0) - 1)
        self._sizes[shard] = self._sizes.get(shard, 0) + 1
        await self._publish_route(account.id, shard)

    async def _publish_route(self, account_id: int, shard: str) -> None:
        """Every instance's route cache, this one's first (at once, even
        with a bus that cannot carry route changes)."""
        self._route_changed(account_id, shard)
        publish = getattr(self._events, "publish_route", None)
        if publish is None:
            log.warning("the event bus cannot carry route changes: other instances stay stale")
            return
        await publish(account_id, shard)

    async def remove_account(self, address: str) -> None:
        """Removes the account, its aliases' references to it stay (an alias
        to a removed account forwards nowhere), its mailboxes and messages,
        and the rights other accounts granted it (RFC 4314) in every shard."""
        account = await self.get_account(address)
        await self._mail_store_for(account.shard).remove_account(account.id)
        for shard in self._shards:
            await self._mail_store_for(shard).remove_grants(account.id)
        async with self._write() as conn:
            await conn.execute(delete(accounts).where(accounts.c.id == account.id))
        self.shard_cache.pop(account.id, None)

    async def authenticate(
        self,
        login: str,
        password: str,
        *,
        run_check: CheckRunner | None = None,
        cache: AuthCache | None = None,
    ) -> Account | None:
        """The account if ``password`` matches, else None. An unknown login
        costs one argon2 verification too, so timing tells nothing.

        A directory that cannot be read raises TEMPORARY, never None: an
        outage is not a wrong password (clients would ask their user for a
        new one). ``run_check(fn)`` runs the argon2 call ``fn`` and returns
        its result (default: a worker thread); the login gate passes its
        bounded pool (:class:`storage.throttle.VerificationPool`).

        ``cache``: the account's row is read on every login, then a cache
        hit (this exact password matched this very hash lately, see
        :mod:`storage.authcache`) answers without argon2; a match is
        remembered there. A wrong password, an unknown login and a changed
        hash always pay a full verification."""
        run: CheckRunner = run_check or asyncio.to_thread
        try:
            account = await self.get_account(login)
        except errors.StorageError as exc:
            if exc.kind is not errors.ErrorKind.NOT_FOUND:
                raise
            await run(functools.partial(self._verify_unknown, password))
            return None
        if cache is not None and cache.hit(account, password):
            return account
        if not await run(functools.partial(self._verify, account.password_hash, password)):
            return None
        if self.hasher.check_needs_rehash(account.password_hash):
            try:
                await self.set_password(account.address, password)
                # The row as it now is: a caller binding something to the
                # hash (the HTTP token's fingerprint) must see the new one.
                account = await self.get_account(account.address)
            except errors.StorageError as exc:  # the password was right: log in anyway
                log.warning("rehashing the password of %s failed: %s", account.address, exc)
        if cache is not None:
            cache.remember(account, password)
        return account

    def _verify_unknown(self, password: str) -> bool:
        """The cost of a verification for a login that does not exist."""
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash("shardmail-dummy-password")
        self._verify(self._dummy_hash, password)
        return False

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (Argon2Error, InvalidHashError):
            return False

    # --- aliases -----------------------------------------------------------------

    async def add_alias(self, source: str, target: str) -> Alias:
        """``source`` is an address or ``@domain`` (catch-all) on a local
        domain (NOT_FOUND otherwise); ``target`` any address. EXISTS if present."""
        source = self._normalize_source(source)
        target = normalize_address(target)
        async with self._write() as conn:
            domain = source.rpartition("@")[2]
            if (
                await conn.execute(select(domains.c.id).where(domains.c.name == domain))
            ).first() is None:
                raise errors.not_found("alias source is not on a local domain")
            try:
                async with conn.begin_nested():
                    result = await conn.execute(
                        insert(aliases).values(source=source, target=target)
                    )
            except IntegrityError:
                raise errors.exists("alias exists") from None
            return Alias(int(result.inserted_primary_key[0]), source, target)

    @staticmethod
    def _normalize_source(source: str) -> str:
        source = source.strip()
        if source.startswith("@"):
            return "@" + normalize_domain(source[1:])
        return normalize_address(source)

    async def list_aliases(self) -> list[Alias]:
        async with self.db.read() as conn:
            rows = await conn.execute(select(aliases).order_by(aliases.c.source, aliases.c.target))
            return [Alias(r.id, r.source, r.target) for r in rows]

    async def remove_alias(self, source: str, target: str | None = None) -> None:
        """Removes one alias, or every alias of ``source``; NOT_FOUND if none."""
        source = self._normalize_source(source)
        stmt = delete(aliases).where(aliases.c.source == source)
        if target is not None:
            stmt = stmt.where(aliases.c.target == normalize_address(target))
        async with self._write() as conn:
            result = await conn.execute(stmt)
            if not result.rowcount:
                raise errors.not_found("no such alias")

    # --- secrets every instance shares ---------------------------------------------

    async def shared_secret(self, name: str, offered: bytes) -> bytes:
        """The site's secret ``name`` (e.g. the HTTP token key): the value
        stored first, by whichever instance got there; ``offered`` is stored
        if there is none yet. Every instance over this directory gets the
        same bytes, now and after restarts. TEMPORARY if the directory
        cannot be reached."""
        found = await self._read_secret(name)
        if found is not None:
            return found
        async with self.db.write() as conn:
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(shared_secrets).values(name=name, value=offered, created=time.time())
                    )
            except IntegrityError:
                pass  # another instance stored it first: theirs is the site's
        found = await self._read_secret(name)
        if found is None:  # removed meanwhile: nothing to agree on yet
            raise errors.StorageError(errors.ErrorKind.TEMPORARY, f"secret {name!r} not stored")
        return found

    async def add_dkim_key(self, domain: str, selector: str, private_pem: bytes) -> None:
        """Stores the DKIM key of ``domain`` and ``selector`` for every
        instance's signers; EXISTS if that pair has one."""
        domain = normalize_domain(domain)
        async with self.db.write() as conn:
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(dkim_keys).values(
                            domain=domain,
                            selector=selector,
                            private_pem=private_pem,
                            created=time.time(),
                        )
                    )
            except IntegrityError:
                raise errors.exists(f"a DKIM key for {selector} of {domain} exists") from None

    async def dkim_key(self, domain: str, selector: str) -> tuple[str, bytes] | None:
        """(selector, PEM) of ``domain``'s key for ``selector``, else of its
        first selector (one rotated by hand); None if the domain has none."""
        try:
            domain = normalize_domain(domain)
        except errors.StorageError:
            return None
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(dkim_keys.c.selector, dkim_keys.c.private_pem)
                .where(dkim_keys.c.domain == domain)
                .order_by(dkim_keys.c.selector)
            )
            found = {r.selector: bytes(r.private_pem) for r in rows}
        if not found:
            return None
        chosen = selector if selector in found else next(iter(found))
        return chosen, found[chosen]

    async def _read_secret(self, name: str) -> bytes | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(shared_secrets.c.value).where(shared_secrets.c.name == name)
                )
            ).first()
        return None if row is None else bytes(row.value)

    # --- routing -----------------------------------------------------------------

    async def resolve(self, address: str) -> Route:
        """Exact account, then exact alias, then plus-address (``user+tag@d``
        -> ``user@d``, RFC 5233 subaddress), then catch-all ``@d``. Alias
        targets on local domains are resolved again (up to a depth limit);
        others are forwarded. Answers may be up to ``ROUTE_CACHE_SECONDS``
        old for changes made by other instances (see the module docstring)."""
        now = time.monotonic()
        hit = self._routes.get(address)
        if hit is not None and hit[0] > now:
            return hit[1]
        generation = self._routes_generation
        route = await self._resolve(address)
        if generation == self._routes_generation:
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[address] = (now + ROUTE_CACHE_SECONDS, route)
        return route

    async def _resolve(self, address: str) -> Route:
        try:
            address = normalize_address(address)
        except errors.StorageError:
            return Route(address, False, (), ())
        epoch = self._shard_epoch
        async with self.db.read() as conn:
            found: dict[int, Account] = {}
            forward: list[str] = []
            domain = address.rpartition("@")[2]
            local_domains = {r[0] for r in await conn.execute(select(domains.c.name))}
            if domain not in local_domains:
                return Route(address, False, (), ())
            await self._expand(conn, address, local_domains, found, forward, set(), 0)
        self._remember(found.values(), epoch)
        return Route(address, True, tuple(found.values()), tuple(dict.fromkeys(forward)))

    async def _lookup(self, conn: Any, address: str) -> tuple[Account | None, list[str]]:
        row = (await conn.execute(select(accounts).where(accounts.c.address == address))).first()
        if row is not None:
            return _account(row), []
        targets = [
            r[0]
            for r in await conn.execute(
                select(aliases.c.target).where(aliases.c.source == address).order_by(aliases.c.id)
            )
        ]
        return None, targets

    async def _expand(
        self,
        conn: Any,
        address: str,
        local_domains: set[str],
        found: dict[int, Account],
        forward: list[str],
        seen: set[str],
        depth: int,
    ) -> None:
        if address in seen or depth > MAX_ALIAS_DEPTH:
            return
        seen.add(address)
        local, _, domain = address.rpartition("@")
        if domain not in local_domains:
            forward.append(address)
            return
        account, targets = await self._lookup(conn, address)
        if account is None and not targets and PLUS_SEPARATOR in local:
            base = local.split(PLUS_SEPARATOR, 1)[0]
            if base:
                account, targets = await self._lookup(conn, f"{base}@{domain}")
        if account is None and not targets:
            account, targets = await self._lookup(conn, "@" + domain)
        if account is not None:
            found[account.id] = account
        for target in targets:
            await self._expand(conn, target, local_domains, found, forward, seen, depth + 1)

    async def addresses_of(self, account: Account) -> list[str]:
        """The account's address, then every alias source whose expansion
        (through alias chains) reaches it."""
        async with self.db.read() as conn:
            rows = (await conn.execute(select(aliases.c.source, aliases.c.target))).all()
        reverse: dict[str, list[str]] = {}
        for src, tgt in rows:
            reverse.setdefault(tgt, []).append(src)
        out = [account.address]
        queue = [account.address]
        while queue:
            for src in sorted(reverse.get(queue.pop(0), ())):
                if src not in out:
                    out.append(src)
                    queue.append(src)
        return out
