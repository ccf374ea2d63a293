"""One POP3 session: the RFC 1939 state machine and one handler per command.

States (RFC 1939 section 3): AUTHORIZATION until a login succeeds and the
maildrop is locked, TRANSACTION while the client reads and marks messages,
UPDATE after QUIT, when marked messages are removed. :data:`STATE_COMMANDS`
is the single table of which command each state allows; ``handle_<cmd>``
is the one function of each command.

Guarantees a client can rely on:

* Every reply is one status line, or a status line and a dot-stuffed,
  CRLF-terminated multi-line body (RFC 1939 section 3). A failure inside
  storage is an ``-ERR [SYS/TEMP]`` or ``-ERR [SYS/PERM]`` line (RFC 2449
  section 8, RFC 3206), never a traceback.
* Passwords never travel in clear unless ``auth.allow_plaintext``: before
  STLS, USER, PASS and AUTH answer ``-ERR [AUTH]`` (RFC 2595 section 4,
  the POP3 counterpart of IMAP LOGINDISABLED) and CAPA does not list them.
* Nothing is deleted unless the client says QUIT in TRANSACTION and the
  UPDATE state commits (see :mod:`imapd.pop3.maildrop`).
* Once the account is fenced for a move to another shard, the next command
  gets ``-ERR [SYS/TEMP]`` and the connection closes, without UPDATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from conf.settings import Settings
from imapd.pop3.connection import Connection, LineTooLong
from imapd.pop3.maildrop import Maildrop, NoSuchMessage
from imapd.pop3.wire import (
    Command,
    DotStuffer,
    WireError,
    decode_sasl_plain,
    err,
    multiline,
    ok,
    parse_command,
    parse_line_count,
    parse_msg_number,
)
from runtime.metrics import AUTH_FAILURES
from storage.api import Storage
from storage.errors import POP3_RESP_CODE, AccountMoving, ErrorKind, StorageError
from storage.model import MessageEntry
from storage.throttle import LoginClient, LoginGate, login_gate

log = logging.getLogger("imapd.pop3")

IMPLEMENTATION = "shardmail"
RETR_CHUNK_SIZE = 64 * 1024
# After this many unknown or malformed commands the client is probably not
# speaking POP3 at all; stop listening to it.
MAX_BAD_COMMANDS = 20


class State(enum.Enum):
    """RFC 1939 section 3 session states."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


# The one table of which commands each state allows (RFC 1939 sections 4-6,
# RFC 2449 section 5 CAPA, RFC 2595 section 4 STLS, RFC 5034 section 4 AUTH).
STATE_COMMANDS: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset({"CAPA", "STLS", "USER", "PASS", "APOP", "AUTH", "QUIT"}),
    State.TRANSACTION: frozenset(
        {"CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "QUIT"}
    ),
    State.UPDATE: frozenset(),
}
KNOWN_COMMANDS = frozenset().union(*STATE_COMMANDS.values())

# Reply texts a test or a log reader recognises.
GREETING = "shardmail POP3 server ready"
SIGNOFF = "shardmail POP3 server signing off"
BAD_STATE = "command not valid in this state"
NO_SUCH_MESSAGE = "no such message"
PLAINTEXT_DISALLOWED = "plaintext authentication disallowed without TLS, use STLS first"
AUTH_FAILED = "authentication failed"
IN_USE = "maildrop already locked by another session"
LINE_TOO_LONG = "line too long"
INTERNAL = "internal error, try again later"


class Refused(Exception):
    """A handler's -ERR reply, with an optional RFC 2449 response code."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


class _Hangup(Exception):
    """End the session now (the reply, if any, has been written)."""


@dataclass
class SessionContext:
    """What every session of one listener shares."""

    settings: Settings
    storage: Storage
    tls: ssl.SSLContext
    idle_timeout: float

    @property
    def logins(self) -> LoginGate:
        """The process's login gate, shared with IMAP, SMTP and HTTP (storage.throttle)."""
        return login_gate(self.storage, self.settings.auth, self.settings.redis)


class Session:
    """Drives one connection from greeting to close; see the module docstring."""

    def __init__(self, ctx: SessionContext, conn: Connection) -> None:
        self.ctx = ctx
        self.conn = conn
        self.pop3 = ctx.settings.pop3
        self.state = State.AUTHORIZATION
        self.user: str | None = None  # USER given, PASS awaited
        self.maildrop: Maildrop | None = None
        self.auth_failures = 0
        self.bad_commands = 0
        self._responding = False  # a multi-line reply is partly written
        # RFC 1939 section 7 APOP: the timestamp is unique per greeting.
        self.apop_timestamp = (
            f"<{os.getpid()}.{secrets.token_hex(8)}@{ctx.settings.server.hostname}>"
            if self.pop3.apop
            else None
        )

    # -- the loop --

    async def run(self) -> None:
        """Greet, serve commands until QUIT, EOF, autologout or a fatal error;
        always release the maildrop and close the connection."""
        greeting = GREETING + (f" {self.apop_timestamp}" if self.apop_timestamp else "")
        self.conn.write(ok(greeting))
        try:
            while True:
                try:
                    line = await self._read_line()
                except LineTooLong:
                    self._bad_command()
                    self.conn.write(err(LINE_TOO_LONG))
                    continue
                await self.dispatch(line)
                await self._drain()
        except (_Hangup, EOFError, ConnectionError):
            pass
        except Exception:
            log.exception("pop3 session from %s failed", self.conn.peer_ip)
            if not self._responding:
                self.conn.write(err(INTERNAL, "SYS/TEMP"))
        finally:
            if self.maildrop is not None:  # no UPDATE: nothing is deleted
                with contextlib.suppress(Exception):
                    await self.maildrop.close()
                self.maildrop = None
            self.conn.close()

    async def _read_line(self) -> bytes:
        # RFC 1939 section 3: the autologout timer is at least 10 minutes. Not
        # before login (pop3.preauth_timeout_seconds): no maildrop is held yet,
        # and idle unauthenticated connections must not pile up.
        timeout = self.ctx.idle_timeout
        if self.state is State.AUTHORIZATION:
            timeout = min(timeout, self.pop3.preauth_timeout_seconds)
        try:
            async with asyncio.timeout(timeout):
                return await self.conn.readline(self.pop3.max_line_length)
        except TimeoutError:
            # Autologout does not enter UPDATE: nothing is deleted.
            self.conn.write(err("autologout; idle for too long"))
            raise _Hangup from None

    async def _drain(self) -> None:
        # A client that stops reading is as idle as one that stops writing;
        # without this bound it would hold the maildrop lease forever.
        try:
            async with asyncio.timeout(self.ctx.idle_timeout):
                await self.conn.drain()
        except TimeoutError:
            log.info("pop3 client %s stopped reading; closing", self.conn.peer_ip)
            self.conn.abort()
            raise _Hangup from None

    def _bad_command(self) -> None:
        self.bad_commands += 1
        if self.bad_commands > MAX_BAD_COMMANDS:
            self.conn.write(err("too many bad commands, closing"))
            raise _Hangup

    async def dispatch(self, line: bytes) -> None:
        """Parse and run one command line; every outcome is one reply."""
        if self.maildrop is not None and self.maildrop.fenced:
            self._end_fenced()
        try:
            command = parse_command(line)
        except WireError as exc:
            self._bad_command()
            self.conn.write(err(str(exc)))
            return
        if command.name not in STATE_COMMANDS[self.state]:
            self._bad_command()
            known = command.name in KNOWN_COMMANDS
            self.conn.write(err(BAD_STATE if known else "unknown command"))
            return
        handler = getattr(self, f"handle_{command.name.lower()}")
        try:
            await handler(command)
        except (Refused, WireError, StorageError, NoSuchMessage) as exc:
            if self._responding:  # mid multi-line reply: the stream is unusable
                raise _Hangup from exc
            if isinstance(exc, AccountMoving):  # the fence's own error: its event was lost
                self._end_fenced()
            self.conn.write(_refusal(exc))

    def _end_fenced(self) -> None:
        """The account is moving to another shard: this session's snapshot
        is the old shard's. Its next command is refused as temporary (RFC
        3206 section 4 SYS/TEMP) and the connection closes without the
        UPDATE state, so no deletion of a stale session is applied (RFC
        1939 section 6: only QUIT in TRANSACTION removes messages). The
        client reconnects to wherever the account is then."""
        self.conn.write(err("account is moving to another server, reconnect", "SYS/TEMP"))
        raise _Hangup

    # -- AUTHORIZATION (RFC 1939 section 4) --

    @property
    def plaintext_allowed(self) -> bool:
        return self.conn.is_tls or self.ctx.settings.auth.allow_plaintext

    def _require_plaintext_allowed(self) -> None:
        if not self.plaintext_allowed:
            raise Refused(PLAINTEXT_DISALLOWED, "AUTH")

    async def handle_capa(self, command: Command) -> None:
        """RFC 2449 section 5."""
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self.plaintext_allowed:
                caps += ["USER", "SASL PLAIN"]
            if not self.conn.is_tls:
                caps.append("STLS")  # RFC 2595 section 4
        caps += ["EXPIRE NEVER", f"IMPLEMENTATION {IMPLEMENTATION}"]
        self.conn.write(multiline(ok("Capability list follows"), caps))

    async def handle_stls(self, command: Command) -> None:
        """RFC 2595 section 4: only before TLS; the session restarts clean."""
        if self.conn.is_tls:
            raise Refused("TLS already active")
        self.conn.write(ok("Begin TLS negotiation"))
        try:
            await self.conn.start_tls(self.ctx.tls)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("pop3 STLS handshake with %s failed: %s", self.conn.peer_ip, exc)
            self.conn.abort()
            raise _Hangup from None
        self.user = None  # RFC 2595 section 4: forget what came before TLS

    async def handle_user(self, command: Command) -> None:
        """RFC 1939 section 7; the reply never says whether the name exists."""
        self._require_plaintext_allowed()
        if len(command.args) != 1:
            raise Refused("syntax: USER name")
        self.user = command.args[0]
        self.conn.write(ok("send PASS"))

    async def handle_pass(self, command: Command) -> None:
        """RFC 1939 section 7: the password is the rest of the line, spaces included."""
        self._require_plaintext_allowed()
        if self.user is None:
            raise Refused("USER first")
        user, self.user = self.user, None
        if not command.rest:
            raise Refused("syntax: PASS password")
        await self._login(user, command.rest)

    async def handle_auth(self, command: Command) -> None:
        """RFC 5034 section 4 with the PLAIN mechanism (RFC 4616)."""
        if not command.args:
            # Pre-RFC 5034 clients list mechanisms with a bare AUTH.
            mechanisms = ["PLAIN"] if self.plaintext_allowed else []
            self.conn.write(multiline(ok("SASL mechanisms follow"), mechanisms))
            return
        if command.args[0].upper() != "PLAIN" or len(command.args) > 2:
            raise Refused("unsupported authentication mechanism")
        self._require_plaintext_allowed()
        if len(command.args) == 2:
            response = command.args[1]
        else:
            self.conn.write(b"+ \r\n")  # RFC 5034 section 4: empty challenge
            try:
                line = await self._read_line()
            except LineTooLong:
                raise Refused(LINE_TOO_LONG) from None
            response = line.decode("ascii", "replace").strip()
        if response == "*":
            raise Refused("authentication cancelled")  # RFC 5034 section 4
        authzid, authcid, password = decode_sasl_plain(response)
        if authzid and authzid.lower() != authcid.lower():
            await self.ctx.logins.refused(authcid, self._client())  # no proxy authorization
            self._auth_failed(authcid)
            return
        await self._login(authcid, password)

    async def handle_apop(self, command: Command) -> None:
        """RFC 1939 section 7. APOP needs a plaintext-equivalent secret per
        account; shardmail stores only argon2 hashes, so no account has one:
        with ``pop3.apop`` on, the greeting carries the timestamp and APOP
        answers -ERR [AUTH] (as for a wrong digest, so nothing leaks)."""
        if self.apop_timestamp is None:
            raise Refused("APOP not supported")
        if len(command.args) != 2:
            raise Refused("syntax: APOP name digest")
        AUTH_FAILURES.inc(protocol="pop3")
        await self.ctx.logins.refused(command.args[0], self._client())
        self.auth_failures += 1
        self.conn.write(err("APOP is not available for this account, use STLS and USER/PASS",
                            "AUTH"))
        self._check_failure_limit()

    def _client(self) -> LoginClient:
        """The client as the login gate sees it; ``gone`` once the connection closed."""

        def gone() -> bool:
            transport = self.conn.transport
            return transport is None or transport.is_closing()

        return LoginClient(self.conn.peer_ip, gone)

    async def _login(self, login: str, password: str) -> None:
        # An unreachable directory or too many checks queued from this address
        # raise TEMPORARY: -ERR [SYS/TEMP] (RFC 3206 section 4), never [AUTH].
        account = await self.ctx.logins.authenticate(
            self.ctx.storage.directory, login, password, self._client()
        )
        if account is None:
            self._auth_failed(login)
            return
        log.info("pop3 login %s from %s", account.address, self.conn.peer_ip)
        try:
            self.maildrop = await Maildrop.open(self.ctx.storage, account, self.pop3.lock_seconds)
        except StorageError as exc:
            if exc.kind is ErrorKind.IN_USE:
                raise Refused(IN_USE, "IN-USE") from None  # RFC 2449 section 8.1.1
            raise
        self.state = State.TRANSACTION
        stat = self.maildrop.stat()
        self.conn.write(ok(f"maildrop has {stat.count} messages ({stat.octets} octets)"))

    def _auth_failed(self, login: str) -> None:
        """The reply to a refused login, already counted and delayed by the gate."""
        AUTH_FAILURES.inc(protocol="pop3")
        self.auth_failures += 1
        log.info("pop3 failed login %r from %s", login[:64], self.conn.peer_ip)
        self.conn.write(err(AUTH_FAILED, "AUTH"))  # RFC 3206 section 4
        self._check_failure_limit()

    def _check_failure_limit(self) -> None:
        if self.auth_failures >= self.ctx.settings.auth.max_failures_per_connection:
            self.conn.write(err("too many authentication failures, closing"))
            raise _Hangup

    async def handle_quit(self, command: Command) -> None:
        """RFC 1939 sections 4 and 6: in TRANSACTION, QUIT enters UPDATE."""
        if self.state is State.TRANSACTION and self.maildrop is not None:
            self.state = State.UPDATE
            try:
                removed = await self.maildrop.commit()
            except StorageError as exc:
                log.warning("pop3 UPDATE for account %s failed: %s",
                            self.maildrop.account.id, exc)
                self.conn.write(err("some deleted messages not removed",
                                    POP3_RESP_CODE[exc.kind]))
                raise _Hangup from None
            left = len(self.maildrop.entries) - removed
            self.conn.write(ok(f"{SIGNOFF} ({removed} deleted, {left} left)"))
        else:
            self.conn.write(ok(SIGNOFF))
        raise _Hangup

    # -- TRANSACTION (RFC 1939 section 5) --

    def _drop(self) -> Maildrop:
        assert self.maildrop is not None  # TRANSACTION implies a maildrop
        return self.maildrop

    async def handle_stat(self, command: Command) -> None:
        if command.args:
            raise Refused("syntax: STAT")
        stat = self._drop().stat()
        self.conn.write(ok(f"{stat.count} {stat.octets}"))

    async def handle_list(self, command: Command) -> None:
        drop = self._drop()
        if len(command.args) > 1:
            raise Refused("syntax: LIST [msg]")
        if command.args:
            number = parse_msg_number(command.args[0])
            entry = self._entry(number)
            self.conn.write(ok(f"{number} {entry.size}"))
            return
        stat = drop.stat()
        lines = [f"{n} {e.size}" for n, e in drop.live()]
        self.conn.write(multiline(ok(f"{stat.count} messages ({stat.octets} octets)"), lines))

    async def handle_uidl(self, command: Command) -> None:
        drop = self._drop()
        if len(command.args) > 1:
            raise Refused("syntax: UIDL [msg]")
        if command.args:
            number = parse_msg_number(command.args[0])
            self.conn.write(ok(f"{number} {drop.unique_id(self._entry(number))}"))
            return
        lines = [f"{n} {drop.unique_id(e)}" for n, e in drop.live()]
        self.conn.write(multiline(ok("unique-id listing follows"), lines))

    async def handle_retr(self, command: Command) -> None:
        if len(command.args) != 1:
            raise Refused("syntax: RETR msg")
        number = parse_msg_number(command.args[0])
        entry = self._entry(number)
        await self._send_message(entry.blob_key, f"{entry.size} octets", None)
        self._drop().retrieved.add(number)

    async def handle_top(self, command: Command) -> None:
        if len(command.args) != 2:
            raise Refused("syntax: TOP msg n")
        number = parse_msg_number(command.args[0])
        lines = parse_line_count(command.args[1])
        entry = self._entry(number)
        await self._send_message(entry.blob_key, "top of message follows", lines)

    async def handle_dele(self, command: Command) -> None:
        if len(command.args) != 1:
            raise Refused("syntax: DELE msg")
        number = parse_msg_number(command.args[0])
        self._entry(number)
        self._drop().delete(number)
        self.conn.write(ok(f"message {number} deleted"))

    async def handle_noop(self, command: Command) -> None:
        self.conn.write(ok())

    async def handle_rset(self, command: Command) -> None:
        drop = self._drop()
        drop.reset()
        stat = drop.stat()
        self.conn.write(ok(f"maildrop has {stat.count} messages ({stat.octets} octets)"))

    def _entry(self, number: int) -> MessageEntry:
        try:
            return self._drop().entry(number)
        except NoSuchMessage:
            raise Refused(NO_SUCH_MESSAGE) from None

    async def _send_message(self, blob_key: str, status: str, top_lines: int | None) -> None:
        """Stream a stored message as a multi-line reply, chunk by chunk.
        The first chunk is read before "+OK" so a missing blob is a clean -ERR."""
        assert self.maildrop is not None  # TRANSACTION state: RETR and TOP only
        blobs = self.ctx.storage.blobs_for(self.maildrop.account)
        chunks = blobs.stream(blob_key, RETR_CHUNK_SIZE).__aiter__()
        try:
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = b""
            except FileNotFoundError:
                raise StorageError(ErrorKind.EXPUNGED, "message no longer available") from None
            self.conn.write(ok(status))
            self._responding = True
            stuffer = DotStuffer()
            cutter = TopCutter(top_lines) if top_lines is not None else None
            async with contextlib.aclosing(_achain(first, chunks)) as message:
                async for chunk in message:
                    done = False
                    if cutter is not None:
                        chunk, done = cutter.feed(chunk)
                    self.conn.write(stuffer.feed(chunk))
                    await self._drain()
                    if done:
                        break
            self.conn.write(stuffer.finish())
            self._responding = False
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def _achain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


class TopCutter:
    """Cuts a message after its header, the blank line and ``lines`` body
    lines (RFC 1939 section 7 TOP). Works on chunks; bare LF or CRLF."""

    __slots__ = ("_count", "_in_header", "_line_has_text", "lines")

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self._in_header = True
        self._count = 0
        self._line_has_text = False  # the current, unfinished line has content

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(what to send of ``data``, whether the cut point was reached)."""
        pos = 0
        while True:
            if not self._in_header:
                # Fast path: the cut is not in this chunk.
                if self._count + data.count(b"\n", pos) < self.lines:
                    self._count += data.count(b"\n", pos)
                    return data, False
            nl = data.find(b"\n", pos)
            if nl < 0:
                if data[pos:].strip(b"\r"):
                    self._line_has_text = True
                return data, False
            has_text = self._line_has_text or bool(data[pos:nl].rstrip(b"\r"))
            self._line_has_text = False
            pos = nl + 1
            if self._in_header:
                if not has_text:  # the blank line ending the header
                    self._in_header = False
                    if self.lines == 0:
                        return data[:pos], True
            else:
                self._count += 1
                if self._count >= self.lines:
                    return data[:pos], True


def _refusal(exc: Exception) -> bytes:
    if isinstance(exc, Refused):
        return err(str(exc), exc.code)
    if isinstance(exc, StorageError):
        return err(exc.message, POP3_RESP_CODE[exc.kind])
    if isinstance(exc, NoSuchMessage):
        return err(NO_SUCH_MESSAGE)
    return err(str(exc))
