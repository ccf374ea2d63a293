"""One IMAP connection's state and command loop (RFC 3501 sections 3 and 5).

Contract: :meth:`Session.run` owns the connection until it ends. Commands
run one at a time in the order received (pipelined commands queue in the
framer); each ends with exactly one tagged reply. A client error gets BAD
or NO with a reason and the connection stays usable; only LOGOUT,
autologout, repeated failed logins or a broken socket end it. Untagged
updates about the selected mailbox (EXISTS, EXPUNGE or VANISHED, FETCH
FLAGS) are sent only where RFC 3501 section 7.4.1 allows: EXPUNGE never
during FETCH, STORE or SEARCH.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from delivery.spool import SpoolFile
from imapd.imap.contexts import expunging
from imapd.imap.mailbox_view import BadSequence, MailboxView, MessageCache
from imapd.imap.notify import NotifyState, after_command, next_event
from imapd.imap.objectid import SECRET_NAME, ObjectIds
from imapd.imap.waitflag import WaitFlag
from imapd.imap.wire import encode
from imapd.imap.wire.commands import Command, ParseError
from imapd.imap.wire.framing import FrameError, LiteralBegin, LiteralChunk, TextSegment
from imapd.imap.wire.parser import parse_command
from storage.acl import ALL, RIGHTS_CAPABILITY, flag_rights
from storage.errors import IMAP_RESPONSE_CODE, AccountMoving, StorageError
from storage.model import SYSTEM_FLAGS, ChangeKind, UidSet
from storage.throttle import LoginGate, login_gate

if TYPE_CHECKING:
    from conf.settings import Settings
    from storage.acl import MailboxAccess
    from storage.api import MailStore, Storage, Subscription
    from storage.model import (
        Account,
        Change,
        Mailbox,
        MailboxChanges,
        MailboxStatus,
        MessageEntry,
    )

log = logging.getLogger("imapd.imap")

# imap.spool_threshold when the settings lack it (APPEND literals past it go
# to a file in <data_dir>/spool as they arrive).
DEFAULT_SPOOL_THRESHOLD = 1024 * 1024
# NOOP/CHECK/IDLE poll storage at most this often when no event said anything
# changed (the event bus is best effort; this is the fallback).
FORCED_POLL_INTERVAL = 2.0
# How long a mailbox name -> id lookup is reused (events clear it sooner).
MAILBOX_CACHE_SECONDS = 30.0
# Non-APPEND literals (passwords, search strings) are small by nature.
MAX_ARGUMENT_LITERAL = 64 * 1024


class State(enum.Enum):
    """RFC 3501 section 3 connection states."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


@dataclass(frozen=True)
class Reply:
    """A tagged completion: status OK / NO / BAD, optional response code."""

    status: str
    text: str
    code: str | None = None


def ok(text: str, code: str | None = None) -> Reply:
    return Reply("OK", text, code)


def no(text: str, code: str | None = None) -> Reply:
    return Reply("NO", text, code)


def bad(text: str, code: str | None = None) -> Reply:
    return Reply("BAD", text, code)


class Connection(Protocol):
    """What the session needs from the transport (server.ImapConnection)."""

    peer: str
    is_tls: bool

    async def next_event(self, timeout: float | None) -> object | None: ...
    def write(self, data: bytes) -> None: ...
    @property
    def congested(self) -> bool: ...
    async def drain(self) -> None: ...
    async def start_tls(self, context: ssl.SSLContext) -> None: ...
    @property
    def compressing(self) -> bool: ...
    def start_compress(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class ServerContext:
    """What every session of one server shares."""

    settings: Settings
    storage: Storage
    tls: ssl.SSLContext | None
    connections: set[Connection] = field(default_factory=set)  # open ones, for shutdown
    objectids: ObjectIds | None = None  # RFC 8474 ids, keyed by the site's secret

    async def object_ids(self) -> ObjectIds:
        """The site's OBJECTID codec (the secret is read once per process)."""
        if self.objectids is None:
            key = await self.storage.directory.shared_secret(SECRET_NAME, ObjectIds.new_key())
            self.objectids = ObjectIds(key)
        return self.objectids

    def setting(self, section: str, name: str, default: object) -> object:
        return getattr(getattr(self.settings, section, None), name, default)

    @property
    def logins(self) -> LoginGate:
        """The process's login gate, shared with POP3, SMTP and HTTP (storage.throttle)."""
        return login_gate(self.storage, self.settings.auth, self.settings.redis)

    @property
    def max_literal(self) -> int:
        return int(self.setting("server", "max_message_size", 25 * 1024 * 1024))  # type: ignore


class Session:
    """Per-connection state; commands live in :mod:`imapd.imap.commands`."""

    def __init__(self, conn: Connection, ctx: ServerContext) -> None:
        self.conn = conn
        self.ctx = ctx
        self.storage = ctx.storage
        self.state = State.NOT_AUTHENTICATED
        self.account: Account | None = None
        self.mail: MailStore | None = None
        self.selected: MailboxView | None = None
        # The selected mailbox when it is another account's (RFC 4314),
        # with the owner's events while it is selected (see select_shared).
        self.shared: MailboxAccess | None = None
        self._shared_sub: Subscription | None = None
        self._shared_watcher: asyncio.Task[None] | None = None
        self.rights_stale = False  # an ACL event named the shared mailbox
        self._permanent_told: str | None = None  # the last PERMANENTFLAGS list sent
        self.enabled: set[str] = set()  # RFC 5161 ENABLE
        self.condstore = False  # RFC 7162 section 3.1: once any CONDSTORE use
        self.login_failures = 0
        self.dirty = False  # an event said the selected mailbox changed
        self.wakeup = WaitFlag()  # news for IDLE; not asyncio.Event (issue #24)
        self._subscription: Subscription | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._spools: list[SpoolFile] = []
        self._last_poll = 0.0
        self._dropped = 0  # the subscription's lost-change count last seen
        self.changes_heard = 0  # changes the watcher took from the bus (see selected_now)
        self.fenced = False  # the account is moving shards: see end_fenced
        self.message_cache = MessageCache()
        self.notify: NotifyState | None = None  # RFC 5465 NOTIFY SET (imapd.imap.notify)
        # STATUS answers by mailbox id, dropped by any event about that mailbox.
        self.status_cache: dict[int, MailboxStatus] = {}
        self._boxes: dict[str, tuple[Mailbox, float]] = {}  # name -> (mailbox, when)
        self.autologout = float(ctx.setting("imap", "autologout_seconds", 1800))  # type: ignore
        preauth = float(ctx.setting("imap", "preauth_timeout_seconds", 60))  # type: ignore
        self.preauth_timeout = min(preauth, self.autologout)
        self.idle_timeout = float(
            ctx.setting("imap", "idle_timeout_seconds", self.autologout)  # type: ignore
        )

    # ------------------------------------------------------------------ output
    def write(self, data: bytes) -> None:
        self.conn.write(data)

    def untagged(self, line: bytes | str) -> None:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.conn.write(b"* " + line + b"\r\n")

    def tagged(self, tag: str, reply: Reply) -> None:
        code = f"[{reply.code}] " if reply.code else ""
        text = reply.text.replace("\r", " ").replace("\n", " ")
        self.conn.write(f"{tag} {reply.status} {code}{text}\r\n".encode("utf-8", "replace"))

    # ------------------------------------------------------------ capabilities
    @property
    def login_disabled(self) -> bool:
        """RFC 3501 section 6.2.3 / 7.2.1: no plaintext passwords before TLS."""
        allow = bool(self.ctx.setting("auth", "allow_plaintext", False))
        return not self.conn.is_tls and not allow

    def capabilities(self) -> list[str]:
        # RFC 9051 section 7.2.2: rev2 beside rev1; ENABLE picks rev2 (see rev2).
        caps = ["IMAP4rev1", "IMAP4rev2", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        caps.append("NAMESPACE")
        if self.state is State.NOT_AUTHENTICATED:
            if not self.conn.is_tls and self.ctx.tls is not None:
                caps.append("STARTTLS")
            if self.login_disabled:
                caps.append("LOGINDISABLED")
            else:
                caps.append("AUTH=PLAIN")
            return caps
        caps += [
            "UIDPLUS",
            "MOVE",
            "UNSELECT",
            "SPECIAL-USE",
            "CREATE-SPECIAL-USE",
            "CHILDREN",
            "LIST-EXTENDED",
            "LIST-STATUS",
            "LIST-METADATA",  # RFC 9590
            f"APPENDLIMIT={self.ctx.max_literal}",
            "CONDSTORE",
            "QRESYNC",
            "ESEARCH",
            "STATUS=SIZE",
            "SORT",  # RFC 5256
            "SORT=DISPLAY",  # RFC 5957
            "THREAD=ORDEREDSUBJECT",
            "THREAD=REFERENCES",
            "ESORT",  # RFC 5267 section 3
            "CONTEXT=SEARCH",  # RFC 5267 section 4 (imapd.imap.contexts)
            "CONTEXT=SORT",
            "SEARCHRES",  # RFC 5182
            "QUOTA",  # RFC 9208 (no QUOTASET: SETQUOTA is refused, section 4.1.3)
            "QUOTA=RES-STORAGE",  # RFC 9208 section 5.1
            "OBJECTID",  # RFC 8474
            "BINARY",  # RFC 3516
            "MULTIAPPEND",  # RFC 3502
            "CATENATE",  # RFC 4469 (relative URLs into this account only, no URLAUTH)
            "SAVEDATE",  # RFC 8514
            "PREVIEW",  # RFC 8970
            "METADATA",  # RFC 5464: server and mailbox entries
            "METADATA-SERVER",  # RFC 5464 section 1: server entries
            "UTF8=ACCEPT",  # RFC 6855 section 3
            "NOTIFY",  # RFC 5465
            "ACL",  # RFC 4314
            RIGHTS_CAPABILITY,  # RFC 4314 section 2.2
        ]
        if not self.conn.compressing:
            caps.append("COMPRESS=DEFLATE")  # RFC 4978 section 3
        return caps

    # -------------------------------------------------------------- main loop
    async def run(self) -> None:
        hostname = str(self.ctx.setting("server", "hostname", "localhost"))
        caps = " ".join(self.capabilities())
        self.untagged(f"OK [CAPABILITY {caps}] {hostname} IMAP4rev1 ready")
        try:
            while self.state is not State.LOGOUT:
                await self.conn.drain()
                # RFC 3501 section 5.4: autologout after at least 30 minutes
                # once authenticated; before that the server may be quicker.
                authenticated = self.state is not State.NOT_AUTHENTICATED
                try:
                    cmd = await self.read_command(
                        self.autologout if authenticated else self.preauth_timeout
                    )
                except TimeoutError:
                    self.untagged("BYE Autologout; idle for too long")
                    break
                if cmd is None:
                    break
                await self.execute(cmd)
            await self.conn.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("IMAP session failed")
            with contextlib.suppress(Exception):
                self.untagged("BYE Internal server error")
        finally:
            self.cleanup()
            self.conn.close()

    def cleanup(self) -> None:
        self.message_cache.clear()  # its octets count against the process's budget
        self.select_shared(None)
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        self._drop_spools()

    def _drop_spools(self) -> None:
        """Removes every spool file of the current command (all paths)."""
        for spool in self._spools:
            spool.remove()
        self._spools.clear()

    def _new_spool(self) -> SpoolFile | None:
        """A spool file for an APPEND literal; None if the disk refuses one."""
        data_dir = Path(str(self.ctx.setting("server", "data_dir", tempfile.gettempdir())))
        try:
            spool = SpoolFile(data_dir / "spool")
        except OSError as exc:
            log.warning("IMAP APPEND spool in %s failed: %s", data_dir / "spool", exc)
            return None
        self._spools.append(spool)
        return spool

    def new_spool(self) -> SpoolFile | None:
        """A spool file removed with the current command's others (on every
        path, when the command ends); None if the disk refuses one."""
        return self._new_spool()

    async def read_command(self, timeout: float | None) -> Command | ParseError | None:
        """The next complete command (literals gathered, "+" sent for
        synchronizing ones), a ParseError, or None once the client is gone."""
        segments: list[bytes] = []
        literals: list[object] = []
        current: bytearray | SpoolFile | None = None
        spool_failed = False  # the disk failed mid-literal: answer NO at the end
        held = 0  # octets of this command's literals kept in memory
        spool_at = int(self.ctx.setting("imap", "spool_threshold", DEFAULT_SPOOL_THRESHOLD))  # type: ignore[call-overload]
        while True:
            if self.notify is not None and not segments:
                # RFC 5465 section 4: notifications while no command is in progress.
                ev = await next_event(self, timeout)
            else:
                ev = await self.conn.next_event(timeout)
            if ev is None:
                return None
            if isinstance(ev, TextSegment):
                segments.append(ev.data)
                if ev.final and spool_failed:
                    self._drop_spools()
                    self.tagged(_tag_of(segments[0]), _SPOOL_FAILED)
                    segments, literals, spool_failed, held = [], [], False, 0
                    continue
                if ev.final:
                    return parse_command(segments, literals, self.utf8)
                continue
            if isinstance(ev, LiteralBegin):
                # Only a logged-in APPEND may send a big literal; before login
                # nothing larger than a password is accepted (no disk DoS).
                is_append = (
                    self.state in (State.AUTHENTICATED, State.SELECTED)
                    and bool(segments)
                    and _is_append(segments[0])
                )
                limit = self.ctx.max_literal if is_append else MAX_ARGUMENT_LITERAL
                if ev.size > limit:
                    reply = (
                        no("Message too large", "TOOBIG")  # RFC 7889 section 4
                        if is_append
                        else bad("Literal too large")
                    )
                    tag = _tag_of(segments[0]) if segments else "*"
                    self.conn_framer_reject(ev.synchronizing)
                    self._drop_spools()
                    self.tagged(tag, reply)
                    segments, literals, spool_failed, held = [], [], False, 0
                    continue
                current = bytearray()
                # The command's literals together, not each one, stay under the
                # threshold in memory: a MULTIAPPEND or CATENATE (RFC 4469) of
                # many small literals spools those past it.
                if is_append and held + ev.size > spool_at and not spool_failed:
                    spool = self._new_spool()
                    if spool is None:
                        # RFC 5530 section 3: our disk, not the client, failed.
                        self.conn_framer_reject(ev.synchronizing)
                        self._drop_spools()
                        self.tagged(_tag_of(segments[0]), _SPOOL_FAILED)
                        segments, literals, spool_failed, held = [], [], False, 0
                        continue
                    current = spool
                else:
                    held += ev.size
                self.conn_framer_accept()
                if ev.synchronizing:
                    self.write(b"+ Ready for literal data\r\n")
                    await self.conn.drain()
                continue
            if isinstance(ev, LiteralChunk):
                try:
                    if isinstance(current, SpoolFile):
                        current.write(ev.data)  # page cache: cheaper than a thread hop
                        if ev.last:
                            current.close()
                    elif current is not None:
                        current += ev.data
                except OSError as exc:
                    log.warning("IMAP APPEND spool write failed: %s", exc)
                    spool_failed = True
                    self._drop_spools()
                    current = None  # the rest of the literal is read and dropped
                if ev.last:
                    if isinstance(current, SpoolFile):
                        literals.append(current)
                    else:
                        literals.append(bytes(current or b""))
                    current = None
                continue
            if isinstance(ev, FrameError):
                self._drop_spools()
                segments, literals, spool_failed, held = [], [], False, 0
                self.tagged(ev.tag or "*", bad(ev.reason))
                await self.conn.drain()

    def conn_framer_accept(self) -> None:
        self.conn.framer.accept()  # type: ignore[attr-defined]

    def conn_framer_reject(self, synchronizing: bool) -> None:
        self.conn.framer.reject(synchronizing)  # type: ignore[attr-defined]

    async def read_continuation(self, timeout: float | None) -> bytes | None:
        """One raw client line answering a "+" continuation (AUTHENTICATE,
        IDLE's DONE). None if the connection closed."""
        while True:
            ev = await self.conn.next_event(timeout)
            if ev is None:
                return None
            if isinstance(ev, TextSegment):
                if ev.final:
                    return ev.data
                continue
            if isinstance(ev, LiteralBegin):
                self.conn_framer_reject(ev.synchronizing)
                return b""
            if isinstance(ev, FrameError):
                return b""

    async def execute(self, cmd: Command | ParseError) -> None:
        from imapd.imap.commands import COMMANDS

        if isinstance(cmd, ParseError):
            self.tagged(cmd.tag, bad(cmd.message, cmd.code))
            return
        if self.fenced:
            self.end_fenced()
            self.tagged(cmd.tag, _MOVING)
            return
        entry = COMMANDS.get(cmd.name)
        if entry is None:  # parser knows it, no handler: should not happen
            self.tagged(cmd.tag, bad(f"Command {cmd.name} not supported"))
            return
        handler, states = entry
        if self.state not in states:
            if self.state is State.AUTHENTICATED and State.SELECTED in states:
                self.tagged(cmd.tag, bad("No mailbox selected"))
            elif self.state is State.NOT_AUTHENTICATED:
                self.tagged(cmd.tag, bad("Log in first"))
            else:
                self.tagged(cmd.tag, bad(f"{cmd.name} not allowed now"))
            return
        try:
            if self.rights_stale:
                await self.refresh_rights()
            reply = await handler(self, cmd)
        except StorageError as err:
            reply = no(err.message, IMAP_RESPONSE_CODE.get(err.kind))
            self._boxes.clear()  # a cached mailbox may be what went away
            # The fence's own error: the FENCE event may have been lost.
            self.fenced = self.fenced or isinstance(err, AccountMoving)
        except BadSequence as err:
            reply = bad(str(err))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("IMAP command %s failed", cmd.name)
            reply = no("Internal error, try again later", "SERVERBUG")
        finally:
            self._drop_spools()
        if cmd.name not in _READ_ONLY:
            self.status_cache.clear()  # our own write: its event may still be queued
        if self.fenced and self.state is not State.LOGOUT:
            self.end_fenced()
        if reply is None:
            return  # the handler answered itself (LOGOUT, STARTTLS, IDLE)
        if self.selected is not None and self.state is State.SELECTED:
            try:
                # RFC 3501 section 7.4.1: no EXPUNGE during FETCH, STORE, SEARCH.
                await self.sync(allow_expunge=cmd.name not in _NO_EXPUNGE)
            except StorageError:
                pass
        if self.notify is not None:  # RFC 5465: what else waits, before the completion
            with contextlib.suppress(StorageError):
                await after_command(self, allow_expunge=cmd.name not in _NO_EXPUNGE)
        self.tagged(cmd.tag, reply)

    # ------------------------------------------------------------ login state
    async def log_in(self, account: Account) -> None:
        self.account = account
        self.mail = self.storage.mail(account)
        self.state = State.AUTHENTICATED
        self._subscription = self.storage.events.subscribe(account.id)
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(self._subscription, account.id)
        )

    @property
    def box_mail(self) -> MailStore:
        """The store of the selected mailbox: the account's own, or the
        owner's seen through this account's rights (storage.acl)."""
        assert self.mail is not None
        return self.mail if self.shared is None else self.shared.store  # type: ignore[return-value]

    @property
    def box_owner(self) -> int:
        """The account id owning the selected mailbox."""
        assert self.account is not None
        return self.account.id if self.shared is None else self.shared.owner.id

    def select_shared(self, access: MailboxAccess | None) -> None:
        """Another account's mailbox is selected (``access``) or none is
        any longer (None). While one is, the session also hears the
        owner's events (the bus is keyed by account), so that other
        users' changes reach it as its own do (RFC 3501 section 7.4.1)."""
        if self._shared_watcher is not None:
            self._shared_watcher.cancel()
            self._shared_watcher = None
        if self._shared_sub is not None:
            self._shared_sub.close()
            self._shared_sub = None
        self.shared = access
        self.rights_stale = False
        if access is None or self.account is None or access.owner.id == self.account.id:
            return
        self._shared_sub = self.storage.events.subscribe(access.owner.id)
        self._shared_watcher = asyncio.get_running_loop().create_task(
            self._watch(self._shared_sub, access.owner.id)
        )

    async def open_access(self, name: str) -> MailboxAccess:
        """The mailbox called ``name`` in any of the session's namespaces
        (imapd/imap/namespace.py) with this account's rights on it: all
        on its own, the granted ones on another's (storage.acl). Raises
        StorageError(NOT_FOUND) as :meth:`mailbox_id_of` does."""
        from imapd.imap.namespace import split_other_user
        from storage.acl import ALL, GrantedStore, MailboxAccess, open_mailbox

        assert self.account is not None and self.mail is not None
        other = split_other_user(name)
        if other is not None:
            return await open_mailbox(self.storage, self.account, *other)
        box = await self.mailbox_id_of(name)
        store = GrantedStore(self.mail, self.account.id, box.id, ALL)
        return MailboxAccess(self.account, box, store)

    async def refresh_rights(self) -> None:
        """An ACL event named the selected shared mailbox: its rights are
        read again, so a revocation holds from the next command on."""
        from storage.acl import rights_in

        access = self.shared
        self.rights_stale = False
        if access is None or self.account is None:
            return
        acl = await access.store.store.acl(access.owner.id, access.mailbox.id)  # type: ignore[attr-defined]
        access.store.rights = rights_in(acl, self.account.id)
        if self.selected is not None:
            # RFC 3501 section 7.1: the flags it may change now, told again.
            self._announce_permanent(self.selected, changed_only=True)

    async def mailboxid(self, mailbox_id: int, owner_id: int | None = None) -> str:
        """RFC 8474 section 4: the MAILBOXID of one of this account's
        mailboxes (or of ``owner_id``'s)."""
        assert self.account is not None
        owner = self.account.id if owner_id is None else owner_id
        return (await self.ctx.object_ids()).encode("F", owner, mailbox_id)

    async def mailbox_id_of(self, name: str) -> Mailbox:
        """The mailbox called ``name``, for commands that need only its id
        (STATUS, COPY, MOVE, APPEND); cached, never for SELECT. Raises
        StorageError(NOT_FOUND)."""
        assert self.mail is not None and self.account is not None
        now = asyncio.get_running_loop().time()
        hit = self._boxes.get(name)
        if hit is not None and now - hit[1] < MAILBOX_CACHE_SECONDS:
            return hit[0]
        box = await self.mail.get_mailbox(self.account.id, name)
        if len(self._boxes) > 1000:
            self._boxes.clear()
        self._boxes[name] = (box, now)
        return box

    def wrote_to(
        self,
        mailbox_id: int,
        claimed: tuple[int, int] | None = None,
        entry: MessageEntry | None = None,
        owner_id: int | None = None,
    ) -> None:
        """Our own APPEND/COPY/MOVE added mail to ``mailbox_id``: when that is
        the selected mailbox, re-read it before the tagged reply (the event
        bus may not have told us yet), so EXISTS comes with the completion
        (RFC 3501 section 6.3.11). Writes elsewhere cost no read.
        ``claimed``: the UIDs (first, last) the write took \\Recent for
        (see :meth:`claims_recent_in`).

        ``entry``: the one message the write added, as stored. If its modseq
        is the one after everything this session has caught up with, and no
        news is waiting, nothing else can have changed the mailbox in
        between (each change takes the next modseq): it is announced as it
        is, without reading the mailbox again. ``owner_id``: the account
        written to (None: this one); mailbox ids are per shard."""
        view = self.selected
        if view is None or view.mailbox.id != mailbox_id or self.account is None:
            return
        if (self.account.id if owner_id is None else owner_id) != self.box_owner:
            return
        if claimed is not None:
            view.claimed.append(claimed)
        if entry is not None and any(e.uid == entry.uid for e, _ in view.arrivals):
            return  # its own NEW event came first, carrying it: announced from there
        top = view.own_new[-1] if view.own_new else None
        # Changes heard whole from this process count as caught up with:
        # the sync applies them with this entry (MailboxView.caught_up).
        caught_up = view.caught_up() if top is None else top.modseq
        # Its own NEW event may have come first and made the session dirty.
        heard_own = (
            entry is not None and not view.unknown_news and view.news == {entry.uid}
        )  # fmt: skip
        if (
            entry is not None
            and (not self.dirty or heard_own)
            and not view.arrivals
            and entry.modseq == caught_up + 1
            and entry.uid > (view.max_uid if top is None else top.uid)
        ):
            view.own_new.append(entry)
            if heard_own:
                self.dirty = False
                view.news.clear()
            else:
                view.own_uids.add(entry.uid)  # its event is still to come
        else:
            self.dirty = True
            view.unknown_news = True

    async def read_entries(self, view: MailboxView, uids: Iterable[int]) -> None:
        """Reads into ``view`` the entries of ``uids`` it has not read yet
        (the snapshot is lazy: see MailboxView), one storage call."""
        missing = view.missing(uids)
        if missing:
            found = await self.box_mail.entries(self.box_owner, view.mailbox.id, UidSet.of(missing))
            view.load(found)

    def claims_recent_in(self, mailbox_id: int) -> bool:
        """Whether a delivery into ``mailbox_id`` should take \\Recent in its
        own transaction: it is selected read-write here, so this session
        is the first told of the message (RFC 3501 section 2.3.2), and the
        claim then costs no write of its own."""
        view = self.selected
        return (
            view is not None
            and self.shared is None
            and view.mailbox.id == mailbox_id
            and not view.read_only
        )

    def forget_mailboxes(self) -> None:
        self._boxes.clear()

    async def _watch(self, sub: Subscription | None, account_id: int) -> None:
        """Applies the changes of ``account_id`` (this account's, or the
        owner's of the selected shared mailbox) heard on ``sub``."""
        if sub is None:
            return
        with contextlib.suppress(asyncio.CancelledError):
            async for change in sub:
                if change.account_id != account_id:
                    continue  # a bus may carry more than was asked for
                if account_id != self.box_owner and change.kind is not ChangeKind.FENCE:
                    # Another account's news (mailbox ids are per shard):
                    # only an own subscription's fence or mailbox changes.
                    if account_id == getattr(self.account, "id", None):
                        if change.kind is ChangeKind.MAILBOX:
                            self._boxes.clear()
                        self.status_cache.clear()
                    continue
                if (
                    change.kind is ChangeKind.MAILBOX
                    and (change.data or {}).get("op") == "acl"
                    and self.shared is not None
                    and change.mailbox_id == self.shared.mailbox.id
                ):
                    self.rights_stale = True
                    self.wakeup.set()
                if change.kind is ChangeKind.FENCE:
                    self.fenced = True
                    self.wakeup.set()
                    continue
                if change.kind is ChangeKind.MAILBOX:
                    self._boxes.clear()
                    self.status_cache.clear()
                elif change.mailbox_id is None:
                    self.status_cache.clear()
                else:
                    self.status_cache.pop(change.mailbox_id, None)
                self.changes_heard += 1
                view = self.selected
                selected_id = view.mailbox.id if view is not None else None
                if self.notify is not None and self.notify.offer(
                    change, selected_id, getattr(sub, "dropped", 0)
                ):
                    self.wakeup.set()  # IDLE sends it (RFC 5465 section 4)
                if view is None or change.mailbox_id not in (view.mailbox.id, None):
                    continue
                if change.modseq is not None and view.skipped_to(change.modseq):
                    # The bus lost what came between: only storage can tell.
                    self.wakeup.set()
                    self.dirty = True
                    view.unknown_news = True
                if change.kind is ChangeKind.NEW and change.uid in view.own_uids:
                    view.own_uids.discard(change.uid)  # our own APPEND, announced already
                    continue
                self.wakeup.set()
                data = change.data or {}
                flags = data.get("flags")
                whole = change.local and change.modseq is not None
                if getattr(sub, "dropped", 0) != self._dropped or len(view.events) > 10_000:
                    # The bus lost changes (slow consumer): re-read storage.
                    self._dropped = getattr(sub, "dropped", 0)
                    view.events.clear()
                    view.distrust()
                    self.dirty = True
                    view.unknown_news = True
                    whole = False
                elif (
                    change.kind is ChangeKind.FLAGS
                    and change.uid is not None
                    and change.modseq is not None
                    and isinstance(flags, list)
                ):
                    # The event says it all: no storage round trip needed.
                    view.events.append((change.uid, change.modseq, frozenset(flags)))
                elif change.kind is ChangeKind.EXPUNGE and change.uid is not None:
                    view.events.append((change.uid, change.modseq or 0, None))
                elif self._arrival(view, change):
                    assert change.entry is not None
                    view.arrivals.append((change.entry, change.recent_floor))
                else:
                    whole = False
                    self.dirty = True  # new mail (needs its entry) or unknown news
                    if change.kind is ChangeKind.NEW and change.uid is not None:
                        view.news.add(change.uid)
                    else:
                        view.unknown_news = True
                if whole:
                    assert change.modseq is not None
                    view.heard_whole.add(change.modseq)

    def _arrival(self, view: MailboxView, change: Change) -> bool:
        """Whether the NEW ``change`` can be announced from its own entry
        (``Change.entry``, set in the process that stored it) without a
        read: the entry is this mailbox's, the session reads its own
        account's mailbox read-write, and the message's \\Recent is
        decided already (its UID below the floor the change carries:
        another session, or this one's own APPEND, claimed it; RFC 3501
        section 2.3.2). Otherwise a read brings it and the current floor,
        with which the session claims what nobody did."""
        entry = change.entry
        return (
            change.kind is ChangeKind.NEW
            and entry is not None
            and entry.uid == change.uid
            and entry.mailbox_id == view.mailbox.id
            and change.recent_floor > entry.uid
            and not view.read_only
            and self.shared is None
        )

    def end_fenced(self) -> None:
        """The account is being moved to another shard: this session's
        mailbox ids and store are the old shard's, so it ends, and the
        client reconnects (RFC 3501 section 7.1.5 BYE; RFC 5530 section 3
        UNAVAILABLE: try again later) to wherever the account is then."""
        self.untagged("BYE [UNAVAILABLE] Account is moving to another server, reconnect")
        self.state = State.LOGOUT

    def selected_now(self, view: MailboxView, heard: int) -> None:
        """SELECT/EXAMINE made ``view`` (read after ``changes_heard`` was
        ``heard``) the selected mailbox. Changes the watcher took meanwhile
        had no view to go to: if there were any, the next sync reads
        storage again from the view's modseq (RFC 3501 section 7.4.1: the
        client still hears of them)."""
        self.selected = view
        self.dirty = self.changes_heard != heard
        view.unknown_news = self.dirty

    # --------------------------------------------------------------- updates
    async def sync(
        self, allow_expunge: bool = True, force: bool = False, poll: bool = False
    ) -> None:
        """:meth:`sync_view`, then the ADDTO/REMOVEFROM of the RFC 5267 UPDATE
        contexts for what it announced (imapd.imap.contexts.refresh: after
        EXISTS, as its section 4.3.3 requires)."""
        await self.sync_view(allow_expunge, force, poll)
        view = self.selected
        if view is not None and view.contexts:
            from imapd.imap.contexts import refresh

            await refresh(self, view)

    async def sync_view(
        self, allow_expunge: bool = True, force: bool = False, poll: bool = False
    ) -> None:
        """Tell the client what changed in the selected mailbox since it last
        heard (RFC 3501 section 7.3.1 EXISTS, 7.4.1 EXPUNGE, 7.4.2 FETCH;
        RFC 7162 section 3.2.10 VANISHED once QRESYNC is enabled).

        Storage is read when an event said the mailbox changed, when
        ``force`` (our own write may not have been announced yet), or on a
        ``poll`` (NOOP, CHECK, IDLE) at most every FORCED_POLL_INTERVAL.

        Every storage call comes first; only once they all succeeded does
        the view change, and the client is told in the same step (no await
        in between). A failed call changes nothing but leaves the session
        owing a read, so no news is lost with it and the view never holds
        a message the client was not told of."""
        view = self.selected
        if view is None or self.mail is None or self.account is None:
            return
        if not (
            self.dirty or force or poll or view.events or view.arrivals or view.own_new
        ) and not (allow_expunge and view.pending_vanished):
            return  # nothing heard, nothing owed: the common case after each command
        now = asyncio.get_running_loop().time()
        if poll and now - self._last_poll >= FORCED_POLL_INTERVAL:
            force = True
        reread = self.dirty or force or _events_need_read(view)
        if reread or view.events or view.arrivals:
            self.wakeup.clear()
        own, view.own_new = view.own_new, []
        distrusts = view.distrusts  # see MailboxView.distrust
        # Heard before any read below starts, so committed before it too.
        arrivals, view.arrivals = view.arrivals, []
        try:
            changes = None
            if reread:
                self._last_poll = now
                self.dirty = False
                view.news.clear()
                view.unknown_news = False
                changes = await self.box_mail.changes_since(
                    self.box_owner, view.mailbox.id, view.modseq
                )
            # Arriving now, not yet announced; see wrote_to for ``own``.
            top = view.max_uid
            if changes is None:
                new = {e.uid: e for e in own}
                # Others' mail as their NEW events carried it; each one's
                # floor says whether a session claimed \Recent already.
                # One at or below the view's modseq was heard after a read
                # that already told of it, or of its expunge.
                new.update(
                    (e.uid, e) for e, _ in arrivals if e.uid > top and e.modseq > view.modseq
                )
                floor = max((f for _, f in arrivals), default=0)
            else:
                new = {e.uid: e for e in changes.changed if e.uid > top}
                floor = changes.recent_floor
            recent = await self._recent_among(view, new, floor) if new else set()
        except BaseException:
            # Nothing applied (view.modseq unmoved): the next sync reads again.
            self.dirty = True
            view.unknown_news = True
            raise
        # Unless the bus lost changes meanwhile: then modseq stays where
        # the next read must start.
        trusted = view.distrusts == distrusts
        if changes is None:
            for e in own:
                if trusted:
                    view.modseq = max(view.modseq, e.modseq)
        else:
            self._apply_changes(view, changes)
        self._apply_events(view, new)
        if changes is None and trusted:
            # Every change up to there is applied now (MailboxView.caught_up).
            view.modseq = view.caught_up()
        view.forget_whole()
        if allow_expunge and view.pending_vanished:
            self.announce_expunge(view, set(view.pending_vanished))
        if new:
            view.add(sorted(new.values(), key=lambda e: e.uid))
            view.recent.update(u for u in recent if u in new)
            if not view.read_only:
                view.claimed = [c for c in view.claimed if c[1] > view.max_uid]
            self.announce_flags(view)
            self.untagged(f"{view.exists} EXISTS")
            if not self.rev2:  # RFC 9051 Appendix E item 5: no RECENT response
                self.untagged(f"{len(view.recent)} RECENT")

    async def _recent_among(
        self, view: MailboxView, new: dict[int, MessageEntry], floor: int = 0
    ) -> set[int]:
        """Which of the ``new`` UIDs (all above the view's) the client is
        to see \\Recent (RFC 3501 section 2.3.2): a read-write session claims
        those it did not claim with its own APPEND; a read-only one
        (sections 2.3.2 and 6.3.2) sees the newest, without claiming.

        ``floor``: the recent floor read with ``new`` (0: unknown). The
        floor only rises, so when every unclaimed UID is below it another
        session was told of them first, and the claim (a write) would
        give this one none of them: it is skipped."""
        if view.read_only:
            count = await self.box_mail.peek_recent(self.box_owner, view.mailbox.id)
            return set(sorted(new)[-count:]) if count > 0 else set()
        mine = {uid for uid in new if view.claimed_by_us(uid)}
        if any(uid >= floor for uid in new if uid not in mine):  # mail we did not claim
            floor = await self.box_mail.claim_recent(self.box_owner, view.mailbox.id)
            mine.update(uid for uid in new if uid >= floor)
        return mine

    def _apply_changes(self, view: MailboxView, changes: MailboxChanges) -> None:
        """A read of storage (changes_since view.modseq): expunged UIDs become
        pending, known entries take their newer state (FETCH FLAGS if the
        flags changed). New UIDs are the caller's."""
        view.modseq = max(view.modseq, changes.highestmodseq)
        view.read_modseq = max(view.read_modseq, changes.highestmodseq)
        known = view.entries
        for uid in changes.vanished:
            if view.contains(uid):
                view.pending_vanished.add(uid)
        gone = view.pending_vanished
        top = view.max_uid
        for e in sorted(changes.changed, key=lambda e: e.uid):
            if e.uid in gone or e.uid > top or not view.contains(e.uid):
                continue
            old = known.get(e.uid)
            if old is None or e.modseq >= old.modseq:
                view.update(e)
                # Never read by this session: what the client holds is
                # unknown, so it is told (RFC 3501 section 7.4.2 allows it).
                if old is None or old.flags != e.flags:
                    self._flag_update(view, e.uid, e.flags, e.modseq)

    def _apply_events(self, view: MailboxView, new: dict[int, MessageEntry]) -> None:
        """Event-bus news (flags, expunges) to the view, and to ``new``
        (mail arriving in this sync, not announced yet)."""
        if not view.events:
            return
        known = view.entries
        events, view.events = view.events, []
        for uid, modseq, flags in events:
            arriving = new.get(uid)
            if arriving is not None:  # news about mail announced below
                if flags is None:
                    del new[uid]  # gone before the client ever saw it
                elif modseq > arriving.modseq:
                    new[uid] = dataclasses.replace(arriving, flags=flags, modseq=modseq)
                continue
            if not view.contains(uid):
                continue  # not ours yet (its NEW event sets dirty) or gone
            if flags is None:
                view.pending_vanished.add(uid)
                continue
            old = known.get(uid)
            if old is None:
                continue  # older than this sync's read (see _events_need_read)
            if modseq > old.modseq:  # events may trail a fresher read
                view.update(dataclasses.replace(old, flags=flags, modseq=modseq))
                if old.flags != flags and uid not in view.pending_vanished:
                    self._flag_update(view, uid, flags, modseq)

    @property
    def has_updates(self) -> bool:
        """Whether news about the selected mailbox waits to be applied."""
        view = self.selected
        return self.dirty or (view is not None and bool(view.events or view.arrivals))

    def announce_flags(self, view: MailboxView, always: bool = False) -> None:
        """FLAGS and PERMANENTFLAGS for the selected mailbox (RFC 3501
        sections 7.2.6 and 7.1): at SELECT (``always``), and whenever its
        messages carry a keyword the client was not told of, which must
        come before any FETCH response showing that keyword. Call it after
        the view took the new flags and before writing them."""
        if not (always or view.unannounced):
            return
        view.keywords |= view.unannounced
        view.unannounced.clear()
        flags = " ".join((*SYSTEM_FLAGS, *sorted(view.keywords)))
        self.untagged(f"FLAGS ({flags})")
        self._announce_permanent(view)

    def permanent_flags(self, view: MailboxView) -> str:
        """What PERMANENTFLAGS lists (RFC 3501 section 7.1): the flags this
        session may change. Read-only: none. In another account's mailbox
        only those its rights allow (RFC 4314 section 4, STORE): \\Seen
        with "s", \\Deleted with "t", the other flags, the keywords and
        "\\*" (it may create keywords) with "w"."""
        if view.read_only:
            return ""
        rights = ALL if self.shared is None else self.shared.rights
        flags = (*SYSTEM_FLAGS, *sorted(view.keywords))
        allowed = [f for f, right in flag_rights(flags).items() if right in rights]
        if "w" in rights:
            allowed.append("\\*")
        return " ".join(allowed)

    def _announce_permanent(self, view: MailboxView, changed_only: bool = False) -> None:
        """The PERMANENTFLAGS response code; with ``changed_only`` only if
        it differs from what the session was last told (rights changed)."""
        permanent = self.permanent_flags(view)
        if changed_only and permanent == self._permanent_told:
            return
        self._permanent_told = permanent
        if view.read_only:
            self.untagged("OK [PERMANENTFLAGS ()] Read-only mailbox")
        else:
            self.untagged(f"OK [PERMANENTFLAGS ({permanent})] Flags permitted")

    def _flag_update(self, view: MailboxView, uid: int, flags: frozenset[str], modseq: int) -> None:
        seq = view.seq_of(uid)
        if seq is None:
            return
        self.announce_flags(view)
        items = [b"FLAGS " + encode.flags(self.display_flags(view, uid, flags))]
        if "QRESYNC" in self.enabled:
            items.insert(0, b"UID %d" % uid)
        if self.condstore:
            items.append(b"MODSEQ (%d)" % modseq)
        self.write(b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n")

    def use_condstore(self) -> None:
        """A CONDSTORE enabling command ran (RFC 7162 section 3.1): from now on
        FETCH and flag updates carry MODSEQ, and on the first one with a
        mailbox selected the client learns its HIGHESTMODSEQ at once
        (section 3.1.2.1), before the command's own responses."""
        if self.condstore:
            return
        self.condstore = True
        view = self.selected
        if view is not None:
            self.untagged(f"OK [HIGHESTMODSEQ {max(view.modseq, 1)}] Highest")

    @property
    def utf8(self) -> bool:
        """ENABLE UTF8=ACCEPT was given (RFC 6855 section 3): mailbox names
        are UTF-8 both ways, APPEND takes UTF8 (...)."""
        return "UTF8=ACCEPT" in self.enabled

    @property
    def rev2(self) -> bool:
        """ENABLE IMAP4rev2 was given (RFC 9051 section 6.3.1): no \\Recent,
        no RECENT or [UNSEEN] responses, SEARCH answered with ESEARCH
        (RFC 9051 Appendix E items 5, 6, 13)."""
        return "IMAP4REV2" in self.enabled

    def display_flags(self, view: MailboxView, uid: int, flags: frozenset[str]) -> list[str]:
        out = sorted(flags)
        if uid in view.recent and not self.rev2:
            out.append("\\Recent")
        return out

    def announce_expunge(self, view: MailboxView, gone: set[int]) -> None:
        """EXPUNGE (RFC 3501 section 7.4.1) or VANISHED (RFC 7162 section
        3.2.10) for ``gone``, after the REMOVEFROM of any UPDATE context
        holding them (RFC 5267 section 4.3.4)."""
        if view.contexts:
            expunging(self, view, gone)
        if "QRESYNC" in self.enabled:
            present = sorted(u for u in gone if view.contains(u))
            view.remove(gone)
            if present:
                self.untagged(b"VANISHED " + encode.sequence_set(present))
            return
        for seq in view.remove(gone):
            self.untagged(f"{seq} EXPUNGE")


def _events_need_read(view: MailboxView) -> bool:
    """Whether a flag event names a message of the snapshot the session
    never read, newer than its last read: the event alone cannot say
    whether its flags are news to the client, a read of the changes
    since ``view.modseq`` can (and brings the entry)."""
    entries = view.entries
    top = view.max_uid
    return any(
        flags is not None and modseq > view.modseq and uid <= top and uid not in entries
        for uid, modseq, flags in view.events
    )


# SORT and THREAD give sequence numbers as SEARCH does (RFC 5256 section 3).
_NO_EXPUNGE = frozenset({"FETCH", "STORE", "SEARCH", "SORT", "THREAD"})
# Commands that change nothing in storage (others invalidate the STATUS cache).
_READ_ONLY = frozenset(
    {"CAPABILITY", "NOOP", "ID", "STATUS", "LIST", "LSUB", "NAMESPACE", "SEARCH",
     "UID SEARCH", "CHECK", "IDLE", "ENABLE", "UNSELECT", "EXAMINE",
     "SORT", "UID SORT", "THREAD", "UID THREAD", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA",
     "GETMETADATA", "CANCELUPDATE", "GETACL", "LISTRIGHTS", "MYRIGHTS"}
)  # fmt: skip


_SPOOL_FAILED = no("Cannot store the message now, try again", "UNAVAILABLE")
_MOVING = no("Account is moving to another server, try again", "UNAVAILABLE")


def _tag_of(segment: bytes) -> str:
    from imapd.imap.wire.framing import guess_tag

    return guess_tag(segment[:64]) or "*"


def _is_append(segment: bytes) -> bool:
    # The tag may take up to 64 octets (framing.guess_tag): look past it.
    parts = segment[:80].split(b" ", 2)
    return len(parts) > 1 and parts[1].upper() == b"APPEND"
