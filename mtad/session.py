"""One SMTP connection: aiosmtpd's protocol machinery with our commands.

aiosmtpd gives us the connection, command dispatch, STARTTLS plumbing (it
clears the read buffer when the TLS session starts, RFC 3207 section 4.2)
and AUTH challenges. We replace what it lacks or does differently: enhanced
status codes on every reply (RFC 2034), path parsing with null sender and
SMTPUTF8, command lines that must end in CRLF (a bare LF or CR gets
``500 5.5.2 Bare LF in command line`` and the line is not executed, RFC
5321 section 2.3.8), our own DATA reader (bare LF refused, limits enforced
without buffering past them), asynchronous AUTH against the directory with the
shared throttle, recipient routing, limits (connections, errors, rates,
timeouts) and delivery. REQUIRETLS (RFC 8689) is offered on TLS sessions
only; MAIL's REQUIRETLS without TLS gets 530 5.7.10, with TLS it tags the
message (queued with it, noted in the Received field).

Which commands a listener allows is decided by its :class:`Mode`:

=========  =========================================================
MX         no AUTH; RCPT only for our domains (554 5.7.1 otherwise)
SUBMISSION STARTTLS, AUTH (after TLS unless auth.allow_plaintext), MAIL
           requires AUTH (530 5.7.0), sender must be the user's (553)
SUBMISSIONS the same over implicit TLS (RFC 8314)
=========  =========================================================
"""

from __future__ import annotations

import asyncio
import binascii
import enum
import logging
import pathlib
from base64 import b64decode
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session

from conf.settings import Settings
from delivery import spamengine
from delivery.acctpolicy import account_filings, senders, with_engine
from delivery.address import Path, PathSyntaxError, parse_path
from delivery.checks import ACCEPT, Action, CheckStage, Flow, Subject, Verdict
from delivery.dsnparams import DsnParamError, mail_dsn, rcpt_dsn, wants
from delivery.headers import (
    from_addresses,
    header_block_end,
    new_queue_id,
    protocol_name,
    received_field,
    strip_forged_results,
)
from delivery.limits import LimitReached, hold_reason
from delivery.spamrules import AuthVerdicts
from delivery.spool import Message, Spooled, message_size, prepend, read_head
from delivery.submit import (
    Routing,
    SubmitError,
    check_quota,
    deliver,
    owns_address,
    resolve_recipient,
    save_sent_copy,
    sendable_addresses,
    sender_allowed,
)
from mtad import replies as R
from mtad.checks import AuthenticationResults, authenticate_message
from mtad.chunks import BdatSyntaxError, ChunkedMessage, ChunkVerdict, parse_bdat
from mtad.data import HEADER_MAX, DataReader, DataVerdict
from mtad.dns import Resolver
from runtime.listen import LeaseHolder
from runtime.metrics import AUTH_FAILURES, CONNECTIONS, CONNECTIONS_TOTAL, MESSAGES_RECEIVED
from storage.api import Storage
from storage.errors import SMTP_REPLY, ErrorKind, StorageError
from storage.model import Account
from storage.shared import RateLimit
from storage.sql.queue import DsnEnvelope, DsnRecipient
from storage.throttle import LoginClient, LoginGate, login_gate

log = logging.getLogger("mtad.smtp")

# RFC 4954 section 4: an AUTH command line may be up to 12288 octets.
AUTH_LINE_LIMIT = 12288
# The most octets of a BDAT chunk read in one go.
CHUNK_READ = 256 * 1024
# How many rate-limit refusals a session gets before it is closed with 421.
RATE_REFUSALS_BEFORE_CLOSE = 2


class Mode(enum.Enum):
    MX = "mx"
    SUBMISSION = "submission"
    SUBMISSIONS = "submissions"


@dataclass
class SmtpContext:
    """What every session of one service shares."""

    settings: Settings
    storage: Storage
    tls: Any  # ssl.SSLContext | None
    resolver: Resolver
    rate_user: RateLimit  # shared by the instances of a site when [redis] is set
    rate_ip: RateLimit
    sessions: set[SmtpSession] = field(default_factory=set)
    closing: bool = False

    @property
    def logins(self) -> LoginGate:
        """The process's login gate, shared with IMAP, POP3 and HTTP (storage.throttle)."""
        return login_gate(self.storage, self.settings.auth, self.settings.redis)


class SmtpSessionState(Session):
    """Connection state (aiosmtpd ``Session``) plus who authenticated."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.account: Account | None = None
        self.addresses: set[str] = set()

    # aiosmtpd logs a deprecation warning on every access; keep it quiet.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class Transaction(Envelope):
    """Per-transaction state (aiosmtpd ``Envelope``) plus the routing so far."""

    def __init__(self) -> None:
        super().__init__()
        self.mail_from: str | None = None  # type: ignore[assignment]
        self.routing = Routing.empty()
        self.size_hint = 0
        self.body = "7BIT"  # MAIL FROM's BODY= (RFC 6152, RFC 3030 section 3)
        self.chunks: ChunkedMessage | None = None  # BDAT's message so far (RFC 3030)
        self.dsn = DsnEnvelope()  # MAIL's RET and ENVID (RFC 3461 sections 4.3, 4.4)
        # RCPT's NOTIFY and ORCPT (RFC 3461 sections 4.1, 4.2): by remote
        # address, for the queue; and the recipients delivered here that
        # asked for a success notice (RFC 3461 section 5.2.3).
        self.rcpt_dsn: dict[str, DsnRecipient] = {}
        self.success_notices: list[tuple[str, DsnRecipient]] = []

    def discard(self) -> None:
        """Drop what the transaction holds (a BDAT message's spool file)."""
        if self.chunks is not None:
            self.chunks.discard()


class CommandLineEnding(Exception):
    """A command line (or AUTH response) not ended by a lone CRLF; ``reply``
    is what the client is told. The line is discarded, never executed."""

    def __init__(self, reply: R.Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def check_command_line(line: bytes) -> None:
    """Raise :class:`CommandLineEnding` unless ``line`` (as read up to and
    including its LF) ends in CRLF with no other CR in it.

    RFC 5321 section 2.3.8: lines end with CRLF and a server should not
    accept a bare LF or CR as a line end; taking them would let a client
    smuggle commands past a front end that reads CRLF lines. Real clients
    (smtplib, curl, msmtp, swaks, Postfix) all send CRLF."""
    n = len(line)
    if n < 2 or line[n - 2] != 0x0D:  # 0x0D is CR
        if line.endswith(b"\n"):
            raise CommandLineEnding(R.COMMAND_BARE_LF)
        return  # end of stream without a line end: aiosmtpd's own handling
    if line.find(b"\r") != n - 2:
        raise CommandLineEnding(R.COMMAND_BARE_CR)


class CommandReader(asyncio.StreamReader):
    """The connection's stream reader: a read up to the default LF separator
    (aiosmtpd's command loop and ``challenge_auth``'s ``readline``) gets
    :func:`check_command_line`; DATA reads name their own separators."""

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        line = await super().readuntil(separator)
        if separator == b"\n":
            check_command_line(line)
        return line


class _Handler:
    """aiosmtpd's handler seam; we use it for exceptions out of a command."""

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, CommandLineEnding):
            return str(error.reply)  # the client's mistake: no traceback
        log.exception("SMTP session error", exc_info=error)
        return str(R.TEMP_FAILURE)


class SmtpSession(LeaseHolder, SMTP):
    """An SMTP server connection for one listener :class:`Mode`. Its
    client's per-IP slot (smtp.max_connections_per_ip) was taken by the
    listener (:mod:`runtime.listen`); the session returns it when the
    connection ends, STARTTLS or not."""

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, ctx: SmtpContext, mode: Mode) -> None:
        smtp = ctx.settings.smtp
        self.ctx = ctx
        self.mode = mode
        self.implicit_tls = mode is Mode.SUBMISSIONS
        # The stream limit must admit a dot-stuffed text line and an AUTH line;
        # command lines are held to their own limit below.
        self.line_length_limit = max(smtp.max_line_length + 1, AUTH_LINE_LIMIT)
        self._deadline = 0.0
        self._greeted = False
        self._errors = 0
        self._auth_failures = 0
        self._rate_refusals = 0
        self._unknown_recipients = 0
        self._client_ip = ""
        super().__init__(
            _Handler(),
            data_size_limit=ctx.settings.server.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=ctx.settings.server.hostname,
            ident="ESMTP shardmail",
            tls_context=None if self.implicit_tls else ctx.tls,
            timeout=smtp.command_timeout_seconds,
        )
        # RFC 5321 section 4.5.3.1.4 command line limit (aiosmtpd keeps this
        # dict on the class; give each session its own).
        self.command_size_limit = smtp.max_command_line_length
        self.command_size_limits = defaultdict(lambda: smtp.max_command_line_length)
        # RFC 1870 section 3 / RFC 6531 section 3.4: SIZE and SMTPUTF8 lengthen MAIL.
        self.command_size_limits["MAIL"] += 26 + 10
        # RFC 3461 section 4: " RET=HDRS ENVID=" and a 100-character ENVID;
        # " NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=" and a 500-character ORCPT.
        self.command_size_limits["MAIL"] += 16 + 100
        self.command_size_limits["MAIL"] += 11  # RFC 8689 section 2: " REQUIRETLS"
        self.command_size_limits["RCPT"] += 36 + 500
        self.command_size_limits["AUTH"] = AUTH_LINE_LIMIT
        # A BDAT line refused as too long would leave its chunk to be read
        # as commands: any BDAT line the stream takes reaches parse_bdat
        # (linear); a size that is no number closes the connection, any
        # other chunk is read in full (RFC 3030 section 2).
        self.command_size_limits["BDAT"] = self.line_length_limit

    # -- plumbing ---------------------------------------------------------

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # aiosmtpd builds a plain StreamReader in SMTP.__init__; give that
        # same object the CRLF check (CommandReader adds no state).
        reader.__class__ = CommandReader
        super()._cb_client_connected(reader, writer)

    def _create_session(self) -> Session:
        return SmtpSessionState(self.loop)

    def _create_envelope(self) -> Envelope:
        return Transaction()

    def _set_post_data_state(self) -> None:
        # Every end of a transaction (RSET, EHLO, end of message, STARTTLS's
        # new session) comes here: the BDAT chunks held so far go with it.
        envelope = getattr(self, "envelope", None)
        if isinstance(envelope, Transaction):
            envelope.discard()
        super()._set_post_data_state()

    @property
    def state(self) -> SmtpSessionState:
        # No assert here: aiosmtpd's __init__ evaluates every attribute.
        return self.session  # type: ignore[return-value]

    @property
    def txn(self) -> Transaction:
        return self.envelope  # type: ignore[return-value]

    @property
    def is_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    @property
    def offers_auth(self) -> bool:
        # Not named auth_*: aiosmtpd takes every auth_* member for a SASL mechanism.
        return self.mode is not Mode.MX and (self.is_tls or self.ctx.settings.auth.allow_plaintext)

    def tls_description(self) -> str | None:
        if not self.is_tls or self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return f"version={ssl_object.version()} cipher={cipher[0] if cipher else '?'}"

    def _tls_note(self) -> str | None:
        """The Received comment on TLS: the cipher, and REQUIRETLS when the
        transaction had it (RFC 8689 section 4.1), so the hop shows it."""
        tls = self.tls_description()
        if tls and self.txn.dsn.require_tls:
            return f"{tls}; REQUIRETLS"
        return tls

    async def _push_raw(self, line: str) -> None:
        # A reply may echo client text (EHLO's name) holding surrogate-escaped
        # octets that were not UTF-8: send them escaped, never fail.
        self._writer.write(line.encode("utf-8", "backslashreplace") + b"\r\n")
        await self._writer.drain()

    async def push(self, status: Any) -> None:
        """Send one reply line, adding an enhanced code and counting errors."""
        line = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        if not self._greeted:  # the 220 greeting carries no enhanced code
            self._greeted = True
            await self._push_raw(line)
            return
        line = R.with_enhanced_code(line)
        code = R.reply_code(line)
        if code is not None and code >= 400 and code != 421:
            self._errors += 1
            if self._errors > self.ctx.settings.smtp.max_errors:
                await self.close_with(R.TOO_MANY_ERRORS)
                return
        await self._push_raw(line)

    async def reply(self, reply: R.Reply, text: str | None = None) -> None:
        await self.push(str(reply if text is None else reply.with_text(text)))

    async def close_with(self, reply: R.Reply) -> None:
        """Send a final reply (421) and close the connection."""
        if self.transport is None:
            return
        try:
            self._writer.write(str(reply).encode() + b"\r\n")
        except Exception:  # the peer may already be gone
            pass
        self.transport.close()

    def _command_timeout(self) -> float:
        """How long to wait for the next command: RFC 5321 section 4.5.3.2.7's
        five minutes inside a transaction, the shorter
        smtp.before_mail_timeout_seconds while none is open."""
        envelope = getattr(self, "envelope", None)
        if envelope is not None and envelope.mail_from is not None:
            return float(self._timeout_duration)
        before_mail = self.ctx.settings.smtp.before_mail_timeout_seconds
        return min(float(self._timeout_duration), before_mail)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # One timer per connection, pushed forward by a deadline instead of
        # being re-created for every line (cheap during long DATA phases).
        self._deadline = self.loop.time() + (duration or self._command_timeout())
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.transport is None:
            return
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        # RFC 5321 section 4.5.3.2: give up with 421 and close.
        log.info("%r timeout", self.session.peer if self.session else None)
        try:
            self.transport.write(str(R.TIMEOUT).encode() + b"\r\n")
        except Exception:
            pass
        self.transport.close()

    async def _handle_client(self) -> None:
        peer = self.session.peer if self.session else None
        self._client_ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        if self.ctx.closing:
            await self.close_with(R.SHUTTING_DOWN)
            return
        self.ctx.sessions.add(self)
        CONNECTIONS.inc(protocol=self._protocol_label)
        CONNECTIONS_TOTAL.inc(protocol=self._protocol_label)
        try:
            await super()._handle_client()
        finally:
            CONNECTIONS.dec(protocol=self._protocol_label)
            self._release()

    @property
    def _protocol_label(self) -> str:
        return "smtp" if self.mode is Mode.MX else "submission"

    def _release(self) -> None:
        self.lease.release()
        self.ctx.sessions.discard(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._release()
        envelope = getattr(self, "envelope", None)
        if isinstance(envelope, Transaction):
            envelope.discard()  # a client gone between BDAT chunks
        if self._timeout_handle is None:  # refused before the greeting
            self._timeout_handle = self.loop.call_later(0, lambda: None)
        super().connection_lost(error)

    # -- greeting commands --------------------------------------------------

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.reply(R.BAD_ARGUMENTS, "Syntax: EHLO hostname")
            return
        self._set_rset_state()  # RFC 5321 section 4.1.4: EHLO resets the transaction
        self.state.host_name = hostname
        self.state.extended_smtp = True
        lines = [
            f"{self.hostname} Hello {hostname}",
            "PIPELINING",  # RFC 2920
            f"SIZE {self.ctx.settings.server.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "CHUNKING",  # RFC 3030 section 2
            "BINARYMIME",  # RFC 3030 section 3
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "DSN",  # RFC 3461 section 3
        ]
        if self.tls_context is not None and not self.is_tls:
            lines.append("STARTTLS")  # RFC 3207
        if self.is_tls:
            lines.append("REQUIRETLS")  # RFC 8689 section 2: only on a TLS session
        if self.offers_auth and not self.state.authenticated:
            lines.append("AUTH PLAIN LOGIN")  # RFC 4954
        # RFC 2034 section 3: no enhanced codes on EHLO replies.
        for line in lines[:-1]:
            await self._push_raw(f"250-{line}")
        await self._push_raw(f"250 {lines[-1]}")

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            await self.reply(R.BAD_ARGUMENTS, "Syntax: HELO hostname")
            return
        self._set_rset_state()
        self.state.host_name = hostname
        self.state.extended_smtp = False
        await self._push_raw(f"250 {self.hostname}")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.reply(R.BAD_ARGUMENTS, "Syntax: STARTTLS")
        elif self.is_tls:
            await self.reply(R.BAD_SEQUENCE, "TLS already active")
        elif self.tls_context is None:
            await self.reply(R.TLS_UNAVAILABLE)
        else:
            # aiosmtpd switches the transport; the new session (connection_made)
            # forgets the EHLO and clears anything buffered (RFC 3207 section 4.2).
            await super().smtp_STARTTLS(arg)

    async def smtp_VRFY(self, arg: str | None) -> None:
        # RFC 5321 section 3.5.3: 252 rather than leaking which users exist.
        if not arg:
            await self.reply(R.BAD_ARGUMENTS, "Syntax: VRFY <address>")
        else:
            await self.reply(R.VRFY_CANNOT)

    # -- AUTH (RFC 4954) ---------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        if self.mode is Mode.MX:
            await self.reply(R.NOT_IMPLEMENTED, "AUTH not available on this port")
            return
        if not self.state.host_name or not self.state.extended_smtp:
            await self.reply(R.NEED_HELO, "Send EHLO first")
            return
        if not self.is_tls and not self.ctx.settings.auth.allow_plaintext:
            await self.reply(R.ENCRYPTION_REQUIRED)
            return
        if self.state.authenticated:
            await self.reply(R.ALREADY_AUTHENTICATED)
            return
        if self.txn.mail_from is not None:  # RFC 4954 section 4: not during a transaction
            await self.reply(R.BAD_SEQUENCE, "AUTH not permitted during a mail transaction")
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.reply(R.BAD_ARGUMENTS, "Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = args[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            await self.reply(R.UNKNOWN_MECHANISM)
            return
        initial = args[1] if len(args) == 2 else None
        credentials = await (
            self._auth_plain(initial) if mechanism == "PLAIN" else self._auth_login(initial)
        )
        if credentials is None:
            return  # a reply was already sent
        login, password = credentials
        client = LoginClient(self._client_ip, self._gone)
        try:
            account = await self.ctx.logins.authenticate(
                self.ctx.storage.directory, login, password, client
            )
        except StorageError as exc:
            # An outage or a busy gate is no verdict on the password: 454
            # (RFC 4954 section 6), and nothing is counted.
            log.warning("AUTH from %s not checked: %s", self._client_ip, exc)
            await self.reply(R.AUTH_TEMP_FAILURE)
            return
        if account is None:  # counted and delayed by the gate already
            self._auth_failures += 1
            AUTH_FAILURES.inc(protocol="submission")
            if self._auth_failures >= self.ctx.settings.auth.max_failures_per_connection:
                await self.close_with(R.TOO_MANY_AUTH_FAILURES)
                return
            await self.reply(R.AUTH_FAILED)
            return
        self.state.authenticated = True
        self.state.account = account
        self.state.addresses = {
            a.lower() for a in await self.ctx.storage.directory.addresses_of(account)
        }
        await self.reply(R.AUTH_OK)

    def _gone(self) -> bool:
        """Whether the client closed the connection (its queued password check is skipped)."""
        return self.transport is None or self.transport.is_closing()

    async def _decode_b64(self, text: str | bytes) -> bytes | None:
        try:
            return b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            await self.reply(R.BAD_ARGUMENTS._replace(enhanced="5.5.2"), "Invalid base64 data")
            return None

    async def _challenge(self, prompt: str) -> bytes | None:
        self._reset_timeout()
        answer = await self.challenge_auth(prompt)
        return None if answer is MISSING else answer  # "*" or bad base64: replied

    async def _auth_plain(self, initial: str | None) -> tuple[str, str] | None:
        if initial is None:
            blob = await self._challenge("")
        elif initial == "=":  # RFC 4954 section 4: empty initial response
            blob = b""
        else:
            blob = await self._decode_b64(initial)
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.reply(R.BAD_ARGUMENTS._replace(enhanced="5.5.2"), "Invalid PLAIN data")
            return None
        authzid, authcid, password = (p.decode("utf-8", "replace") for p in parts)
        if authzid and authzid.lower() != authcid.lower():  # RFC 4616: no proxy auth
            await self.reply(R.AUTH_FAILED)
            return None
        return authcid, password

    async def _auth_login(self, initial: str | None) -> tuple[str, str] | None:
        login = (
            await self._challenge(self.AuthLoginUsernameChallenge)
            if initial is None
            else await self._decode_b64(initial)
        )
        if login is None:
            return None
        password = await self._challenge(self.AuthLoginPasswordChallenge)
        if password is None:
            return None
        return login.decode("utf-8", "replace"), password.decode("utf-8", "replace")

    # -- the transaction ---------------------------------------------------

    def _precondition(self) -> R.Reply | None:
        """Common preconditions of MAIL/RCPT/DATA/BDAT: the refusal, or None."""
        if not self.state.host_name:
            return R.NEED_HELO
        if self.mode is not Mode.MX and not self.state.authenticated:
            return R.AUTH_REQUIRED
        return None

    async def _needs(self) -> bool:
        """:meth:`_precondition`, replied; True if a reply was sent."""
        refusal = self._precondition()
        if refusal is not None:
            await self.reply(refusal)
            return True
        return False

    async def _parse(self, keyword: str, arg: str | None, allow_null: bool) -> Path | None:
        try:
            path = parse_path(keyword, arg, allow_null=allow_null)
        except PathSyntaxError as exc:
            bad = R.BAD_SENDER_SYNTAX if keyword == "FROM:" else R.BAD_RECIPIENT_SYNTAX
            await self.reply(bad, f"{bad.text}: {exc}")
            return None
        if path.params and not self.state.extended_smtp:
            await self.reply(R.BAD_ARGUMENTS, "Parameters require EHLO")
            return None
        return path

    def _owns(self, address: str) -> bool:
        """Whether the authenticated user may send as ``address`` (smtp.sender_*)."""
        settings, account = self.ctx.settings, self.state.account
        if account is None:
            return False
        owned = sendable_addresses(account, self.state.addresses, settings)
        return owns_address(address, owned, plus=settings.smtp.sender_plus_addresses)

    def _foreign_from(self, content: Message) -> R.Reply | None:
        """RFC 6409 section 8.1: with smtp.header_from_must_match, every header
        From address of a submitted message must be the user's own; the
        refusal names the first that is not. No From field: left alone."""
        if self.mode is Mode.MX or not self.ctx.settings.smtp.header_from_must_match:
            return None
        header = content.prefix if isinstance(content, Spooled) else content
        for address in from_addresses(header):
            if not self._owns(address):
                owner = self.state.account.address if self.state.account else "?"
                return R.FROM_NOT_OWNED.with_text(f"From: header <{address}> not owned by {owner}")
        return None

    def _rate_keys(self) -> list[tuple[RateLimit, str]]:
        keys = [(self.ctx.rate_ip, self._client_ip)]
        if self.state.account is not None:
            keys.append((self.ctx.rate_user, self.state.account.address))
        return keys

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._needs():
            return
        if self.txn.mail_from is not None:
            await self.reply(R.NESTED_MAIL)
            return
        path = await self._parse("FROM:", arg, allow_null=True)
        if path is None:
            return
        params = dict(path.params)
        body = (params.pop("BODY", None) or "7BIT").upper()
        # RFC 6152 section 2, RFC 3030 section 3 (BINARYMIME).
        if body not in ("7BIT", "8BITMIME", "BINARYMIME"):
            await self.reply(R.BAD_ARGUMENTS, "BODY must be 7BIT, 8BITMIME or BINARYMIME")
            return
        smtputf8 = "SMTPUTF8" in params
        if smtputf8 and params.pop("SMTPUTF8") is not None:
            await self.reply(R.BAD_ARGUMENTS, "SMTPUTF8 takes no value")
            return
        size = params.pop("SIZE", None)
        params.pop("AUTH", None)  # RFC 4954 section 5: accepted, not trusted
        require_tls = "REQUIRETLS" in params
        if require_tls and params.pop("REQUIRETLS") is not None:
            await self.reply(R.BAD_ARGUMENTS, "REQUIRETLS takes no value")  # RFC 8689 section 2
            return
        if require_tls and not self.is_tls:
            await self.reply(R.REQUIRETLS_NEEDS_TLS)
            return
        try:
            dsn = mail_dsn(params)
        except DsnParamError as exc:
            await self.reply(R.BAD_ARGUMENTS, str(exc))
            return
        if require_tls:
            dsn = replace(dsn, require_tls=True)  # RFC 8689 section 4.1: tag the message
        if params:
            await self.reply(R.PARAM_UNKNOWN)
            return
        if size is not None:
            if not size.isdigit():
                await self.reply(R.BAD_ARGUMENTS, "SIZE must be a number")
                return
            if int(size) > self.ctx.settings.server.max_message_size:  # RFC 1870 section 6.1
                await self.reply(R.MESSAGE_TOO_BIG)
                return
        if not path.is_ascii and not smtputf8:
            await self.reply(R.SMTPUTF8_REQUIRED)
            return
        if self.mode is not Mode.MX and self.ctx.settings.smtp.sender_must_match:
            if not self._owns(path.address):
                await self.reply(R.SENDER_NOT_OWNED)
                return
        for limiter, key in self._rate_keys():
            if await limiter.wait(key):
                self._rate_refusals += 1
                if self._rate_refusals >= RATE_REFUSALS_BEFORE_CLOSE:
                    await self.close_with(R.RATE_LIMITED_SESSION)
                else:
                    await self.reply(R.RATE_LIMITED)
                return
        self.txn.mail_from = path.address
        self._reset_timeout()  # a transaction is open: the RFC 5321 timer from now on
        self.txn.smtp_utf8 = smtputf8
        self.txn.mail_options = [f"BODY={body}"]
        self.txn.body = body
        self.txn.dsn = dsn
        self.txn.size_hint = int(size) if size else 0
        await self.reply(R.SENDER_OK)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._needs():
            return
        if self.txn.mail_from is None:
            await self.reply(R.NEED_MAIL)
            return
        path = await self._parse("TO:", arg, allow_null=False)
        if path is None:
            return
        params = dict(path.params)
        try:
            dsn = rcpt_dsn(params)
        except DsnParamError as exc:
            await self.reply(R.BAD_ARGUMENTS, str(exc))
            return
        if params:
            await self.reply(R.PARAM_UNKNOWN)
            return
        if not path.is_ascii and not self.txn.smtp_utf8:
            await self.reply(R.SMTPUTF8_REQUIRED)
            return
        if len(self.txn.rcpt_tos) >= self.ctx.settings.smtp.max_recipients:
            await self.reply(R.TOO_MANY_RECIPIENTS)  # RFC 5321 section 4.5.3.1.10
            return
        try:
            route = await resolve_recipient(
                self.ctx.storage,
                path.address,
                self.ctx.settings.smtp.postmaster,
                self.ctx.settings,  # [srs]: bounces to forwarded mail's senders
            )
            if self.mode is Mode.MX and not route.local_domain:
                await self.reply(R.RELAY_DENIED)
                return
            if self.txn.body == "BINARYMIME" and (route.forward or not route.local_domain):
                # RFC 3030 section 3: BINARYMIME goes on only to a next hop
                # that offers it, and the outbound client sends DATA only.
                await self.reply(R.BINARYMIME_NOT_RELAYED)
                return
            for account in route.accounts:
                await check_quota(self.ctx.storage, account, self.txn.size_hint)
        except SubmitError as err:
            if err.kind is ErrorKind.NOT_FOUND:
                await self._unknown_recipient()
            else:
                await self.reply(self._error_reply(err))
            return
        except StorageError as err:
            await self.reply(self._error_reply(SubmitError(err.kind, str(err))))
            return
        self.txn.routing.add(route, path.address)
        self.txn.rcpt_tos.append(path.address)
        # RFC 3461 section 5.2.7: an alias's targets keep the RCPT's parameters.
        for target in route.forward if route.local_domain else (path.address,):
            self.txn.rcpt_dsn.setdefault(target, dsn)
        if route.accounts and wants(dsn, "SUCCESS", default=False):
            self.txn.success_notices.append((path.address, dsn))
        await self.reply(R.RECIPIENT_OK)

    async def _unknown_recipient(self) -> None:
        """550 5.1.1, not counted toward smtp.max_errors: a mailing list with
        stale addresses is no protocol abuse. Probing for addresses is bounded
        by its own, higher smtp.max_unknown_recipients per connection, past
        which the session ends with 421 (RFC 5321 section 3.8)."""
        self._unknown_recipients += 1
        if self._unknown_recipients > self.ctx.settings.smtp.max_unknown_recipients:
            await self.close_with(R.TOO_MANY_UNKNOWN_RECIPIENTS)
            return
        await self._push_raw(str(R.UNKNOWN_USER))

    def _error_reply(self, err: SubmitError) -> R.Reply:
        if err.kind is ErrorKind.NOT_FOUND:
            return R.UNKNOWN_USER
        if err.kind is ErrorKind.OVER_QUOTA:
            return R.MAILBOX_FULL
        code, enhanced = SMTP_REPLY.get(err.kind, (451, "4.3.0"))
        text = "Temporary local problem, try again later" if code < 500 else str(err)
        return R.Reply(code, enhanced, text)

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self._needs():
            return
        if self.txn.mail_from is None:
            await self.reply(R.NEED_MAIL)
            return
        if not self.txn.rcpt_tos:
            await self.reply(R.NEED_RCPT)
            return
        if arg:
            await self.reply(R.BAD_ARGUMENTS, "Syntax: DATA")
            return
        if self.txn.chunks is not None:  # RFC 3030 section 2: no DATA after BDAT
            await self.reply(R.BAD_SEQUENCE, "DATA not allowed after BDAT")
            return
        if self.txn.body == "BINARYMIME":  # RFC 3030 section 3
            await self.reply(R.BAD_SEQUENCE, "BODY=BINARYMIME requires BDAT")
            return
        await self._push_raw("354 End data with <CR><LF>.<CR><LF>")
        smtp = self.ctx.settings.smtp
        data = DataReader(
            self.ctx.settings.server.max_message_size,
            smtp.max_line_length,
            spool_at=smtp.spool_threshold,
            spool_dir=self.ctx.settings.data_dir / "spool",
            # RFC 6409 section 8 lets an MSA fix line ends; the MX as configured.
            normalize_bare=self.mode is not Mode.MX or smtp.mx_bare_lf == "normalize",
        )
        try:  # the spool file goes on every path, a lost connection included
            await self._read_data(data)
            self._reset_timeout()
            if self.transport is None:
                return
            try:
                await self.reply(await self._end_of_data(data))
            finally:
                self._set_post_data_state()
        finally:
            data.discard()

    async def _read_data(self, data: DataReader) -> None:
        """Feed ``data`` until the end-of-data line or a lost connection."""
        timeout = self.ctx.settings.smtp.data_timeout_seconds
        # The hot loop of the server: locals only. Each read pushes the
        # RFC 5321 section 4.5.3.2.5 data-block deadline forward; the timer
        # itself is re-armed lazily (see _reset_timeout).
        self._reset_timeout(timeout)
        readuntil, feed, clock = self._reader.readuntil, data.feed, self.loop.time
        # Whole runs of lines up to the next ".CRLF" first: the end of data
        # (section 4.1.1.4) is such a line, and a run always ends at a line
        # end, so DataReader sees exactly the lines it would one by one.
        # A run longer than the reader's limit (a big message with no line
        # ending in a dot) leaves the rest to the line-by-line loop.
        while self.transport is not None:
            try:
                block = await readuntil(b".\r\n")
            except asyncio.LimitOverrunError:
                break
            self._deadline = clock() + timeout
            if data.feed_lines(block):
                return
        while self.transport is not None:
            try:
                line = await readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                data.fragment(await self._reader.read(exc.consumed))
                self._deadline = clock() + timeout
                continue
            self._deadline = clock() + timeout
            if feed(line):
                return

    async def _end_of_data(self, data: DataReader) -> R.Reply:
        if data.verdict is DataVerdict.TOO_BIG:
            return R.MESSAGE_TOO_BIG
        if data.verdict is DataVerdict.LINE_TOO_LONG:
            return R.DATA_LINE_TOO_LONG.with_text(
                f"Message line longer than {data.max_line} octets (RFC 5321 section 4.5.3.1.6)"
            )
        if data.verdict is DataVerdict.BARE_LINE_ENDING:
            return R.BARE_LF
        if data.verdict is DataVerdict.SMUGGLING:
            return R.SMUGGLING
        if data.verdict is DataVerdict.SPOOL_FAILED:
            log.warning("DATA spool in %s failed", data.spool_dir)
            return R.TEMP_FAILURE
        return await self._received(data.message())

    async def _received(self, received: bytes | pathlib.Path) -> R.Reply:
        """The reply to a whole message, by DATA or BDAT: cleaned, checked and
        delivered (committed before a 250 is returned) or refused."""
        content = await self._cleaned(received)
        return content if isinstance(content, R.Reply) else await self._accept(content)

    # -- BDAT (RFC 3030) ----------------------------------------------------

    async def smtp_BDAT(self, arg: str | None) -> None:
        """RFC 3030 section 2: read exactly chunk-size octets, then reply.
        A chunk is read (or discarded) in full whatever the reply, so a
        pipelining client stays in sync: "If a failure occurs after a BDAT
        command is received, the receiver-SMTP MUST accept and discard the
        associated message data before sending the appropriate 5XX or 4XX
        code." That holds for a chunk over the message size limit on its
        own too: its octets are counted and dropped as they arrive, never
        held, and the 552 comes after them. Once a chunk is refused the
        transaction has failed: later chunks of it (already pipelined, RFC
        3030 section 2) are read, dropped and refused the same way until
        BDAT LAST or RSET ends it. Only a size that is not 1*DIGIT ends the
        session, since the chunk's end could then not be found."""
        max_size = self.ctx.settings.server.max_message_size
        try:
            args = parse_bdat(arg)
        except BdatSyntaxError as exc:
            await self.reply(R.BAD_ARGUMENTS, f"{exc}; closing connection")
            self._close_transport()
            return
        refusal = self._bdat_refusal()
        txn = self.txn
        if refusal is None and txn.chunks is None:
            smtp = self.ctx.settings.smtp
            txn.chunks = ChunkedMessage(
                max_size,
                spool_at=smtp.spool_threshold,
                spool_dir=self.ctx.settings.data_dir / "spool",
            )
        chunks = txn.chunks if refusal is None else None
        failed = chunks is not None and chunks.verdict is not ChunkVerdict.OK
        if chunks is not None:
            chunks.announce(args.size)
        if not await self._read_chunk(args.size, chunks):
            return
        if refusal is None and chunks is not None:
            refusal = self._chunk_refusal(chunks)
        if refusal is not None:
            if args.last and chunks is not None:
                self._set_post_data_state()  # the refused transaction ends here
            if failed:
                # A failed transaction's pipelined chunks (RFC 3030 section
                # 2) repeat its one error: not counted toward smtp.max_errors.
                await self._push_raw(str(refusal))
            else:
                await self.reply(refusal)
            return
        assert chunks is not None
        if not args.last:
            await self.reply(R.OK, f"{args.size} octets received")
            return
        try:
            reply = await self._received(chunks.message())
        finally:
            self._set_post_data_state()
        await self.reply(reply)

    def _bdat_refusal(self) -> R.Reply | None:
        """Why a BDAT chunk cannot be taken in this state (RFC 3030 section
        2: 503 without a transaction), or None."""
        refusal = self._precondition()
        if refusal is not None:
            return refusal
        if not self.state.extended_smtp:  # CHUNKING is an EHLO extension
            return R.BAD_SEQUENCE.with_text("BDAT requires EHLO")
        if self.txn.mail_from is None:
            return R.NEED_MAIL
        if not self.txn.rcpt_tos:
            return R.NEED_RCPT
        return None

    def _chunk_refusal(self, chunks: ChunkedMessage) -> R.Reply | None:
        if chunks.verdict is ChunkVerdict.TOO_BIG:
            return R.MESSAGE_TOO_BIG
        if chunks.verdict is ChunkVerdict.SPOOL_FAILED:
            log.warning("BDAT spool in %s failed", chunks.spool_dir)
            return R.TEMP_FAILURE
        return None

    async def _read_chunk(self, size: int | None, chunks: ChunkedMessage | None) -> bool:
        """Read ``size`` octets into ``chunks`` (None: read and drop them),
        a block at a time as they arrive; False if the connection was lost
        first. A ``size`` of None (more digits than any connection carries
        octets) reads until the connection ends. The RFC 5321 section
        4.5.3.2.5 data-block deadline applies to each read, so a client
        that stops sending is closed as in DATA."""
        timeout = self.ctx.settings.smtp.data_timeout_seconds
        self._reset_timeout(timeout)
        read, clock = self._reader.read, self.loop.time
        remaining = CHUNK_READ if size is None else size
        while remaining > 0:
            if self.transport is None:
                return False
            block = await read(min(remaining, CHUNK_READ))
            if not block:  # end of stream before the chunk's end
                self._close_transport()
                return False
            self._deadline = clock() + timeout
            if size is not None:
                remaining -= len(block)
            if chunks is not None:
                chunks.feed(block)
        self._reset_timeout()
        return self.transport is not None

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _cleaned(self, received: bytes | pathlib.Path) -> Message | R.Reply:
        """The message without forged Authentication-Results of ours (RFC 8601
        section 5). A spooled message's header is read into memory (up to
        the larger of the spool threshold and HEADER_MAX) and the body stays
        in its file; a header longer than that is refused (552)."""
        hostname = self.ctx.settings.server.hostname
        if not isinstance(received, pathlib.Path):
            return strip_forged_results(received, hostname)
        limit = max(self.ctx.settings.smtp.spool_threshold, HEADER_MAX)
        head, file_size = await asyncio.to_thread(read_head, received, limit + 4)
        if head.startswith(b"\r\n"):
            end = 2  # no header fields at all
        elif (blank := head.find(b"\r\n\r\n")) >= 0:
            end = blank + 4
        elif len(head) < file_size:
            return R.HEADER_TOO_BIG.with_text(f"Message header exceeds {limit} octets")
        else:
            end = file_size  # all header, no body
        header = strip_forged_results(head[:end], hostname)
        return Spooled(header, received, end, file_size)

    async def _accept(self, content: Message) -> R.Reply:
        """Checks, trace fields, delivery; the reply to end of data.
        ``content`` is the cleaned message, in memory or spooled."""
        txn, state, settings = self.txn, self.state, self.ctx.settings
        foreign = self._foreign_from(content)
        if foreign is not None:
            return foreign
        queue_id = new_queue_id()
        protocol = protocol_name(
            esmtp=bool(state.extended_smtp),
            tls=self.is_tls,
            auth=bool(state.authenticated),
            utf8=txn.smtp_utf8,
        )
        received = received_field(
            helo=state.host_name or "unknown",
            client_ip=self._client_ip,
            hostname=settings.server.hostname,
            protocol=protocol,
            queue_id=queue_id,
            tls=self._tls_note(),
            recipient=txn.rcpt_tos[0] if len(txn.rcpt_tos) == 1 else None,
        )
        mailbox = "INBOX"
        dmarc_junk = False
        engine: dict[int, spamengine.Filing] | None = None  # the built-in engine's, per account
        mail_from = txn.mail_from or ""
        checked = await self._content_checks(content, mail_from)
        if checked.action >= Action.TEMPFAIL:
            log.info("%s: refused by %s: %s", queue_id, checked.check, checked.text)
            return R.Reply(*checked.reply) if checked.reply else R.TEMP_FAILURE
        if checked.action is Action.QUARANTINE:
            mailbox = "Junk"
        trace = checked.headers + received
        if self.mode is Mode.MX:
            results = await authenticate_message(
                self.ctx.resolver,
                authserv_id=settings.server.hostname,
                client_ip=self._client_ip,
                helo=state.host_name or "",
                mail_from=mail_from,
                message=content if isinstance(content, bytes) else content.prefix,
                whole=None if isinstance(content, bytes) else content.read_all,
                spf_enabled=settings.smtp.spf,
                dkim_enabled=settings.smtp.dkim_verify,
                dmarc_enabled=settings.smtp.dmarc,
            )
            await self._tally_dmarc(queue_id, results)
            verdict = results.dmarc.disposition if results.dmarc else "none"
            if verdict == "reject" and settings.smtp.dmarc_reject:
                log.info("%s: DMARC reject for %s", queue_id, results.dmarc)
                return R.DMARC_REJECT
            if verdict in ("reject", "quarantine"):
                mailbox = "Junk"
                dmarc_junk = True
            trace = checked.headers + results.header() + received
            if settings.antispam.builtin_on and txn.routing.local:
                engine = await self._spam_filing(queue_id, content, results, checked, mailbox)
        message = prepend(trace, content)
        try:
            held_for = None
            if self.mode is not Mode.MX and state.account is not None and txn.routing.remote:
                held_for = await hold_reason(
                    self.ctx.storage, settings, state.account, len(txn.routing.remote)
                )
            delivered, _ = await deliver(
                self.ctx.storage,
                mail_from=mail_from,
                routing=txn.routing,
                message=message,
                mailbox=mailbox,
                held_for=held_for,
                filing=await self._filings(content, mail_from, checked, dmarc_junk, engine),
                dsn=txn.dsn,
                recipient_dsn=txn.rcpt_dsn,
                settings=settings,
            )
            if (
                self.mode is not Mode.MX
                and state.account is not None
                and settings.smtp.save_sent_copy
            ):
                await save_sent_copy(self.ctx.storage, state.account, message)
        except LimitReached as err:
            # RFC 5321 section 4.2.5 (450: try later), RFC 3463 X.7.1 (not authorized).
            log.info("%s: refused: %s", queue_id, err)
            return R.Reply(450, "4.7.1", str(err))
        except SubmitError as err:
            log.info("%s: refused: %s", queue_id, err)
            return self._error_reply(err)
        except StorageError as err:
            log.warning("%s: storage error: %s", queue_id, err)
            return self._error_reply(SubmitError(err.kind, str(err)))
        for limiter, key in self._rate_keys():
            await limiter.record(key)
        MESSAGES_RECEIVED.inc(protocol=self._protocol_label)
        log.info(
            "%s: from=<%s> local=%d remote=%d size=%d",
            queue_id,
            mail_from,
            len(delivered),
            len(txn.routing.remote),
            message_size(message),
        )
        if txn.success_notices and mail_from:
            await self._delivered_notice(queue_id, mail_from, content)
        # An RFC 3464 report is small; a spooled message is not one to parse.
        if self.mode is Mode.MX and not mail_from and delivered and isinstance(content, bytes):
            await self._process_bounce(queue_id, content)
        # RFC 5965 complaints come from a mailbox (not null) and are small too.
        if self.mode is Mode.MX and delivered and isinstance(content, bytes):
            await self._process_reports(queue_id, content)
        return R.QUEUED.with_text(f"OK: queued as {queue_id}")

    async def _content_checks(self, content: Message, mail_from: str) -> Verdict:
        """The check stage (delivery/checks.py: anti-virus, anti-spam, DNS
        lists through our resolver) on the message as received, at the end
        of DATA: a refusal is the reply to it (RFC 5321 section 4.2.5),
        before anything is stored or queued."""
        stage = CheckStage.from_settings(self.ctx.settings, self.ctx.resolver)
        if not stage:
            return ACCEPT
        state = self.state
        return await stage.run(
            Subject(
                Flow.MX if self.mode is Mode.MX else Flow.SUBMISSION,
                content,
                mail_from,
                tuple(self.txn.rcpt_tos),
                client_ip=self._client_ip,
                helo=state.host_name or "",
                account=state.account.address if state.account is not None else None,
            )
        )

    async def _filings(
        self,
        content: Message,
        mail_from: str,
        checked: Verdict,
        dmarc_junk: bool,
        engine: dict[int, spamengine.Filing] | None,
    ) -> dict[int, tuple[str, bytes]] | None:
        """MX only: where each local recipient's copy goes by its own sender
        lists and Junk threshold (delivery/acctpolicy.py), with the fields
        saying why: the built-in engine's X-Spam-* fields (``engine``, its
        filing of each account's copy, if it ran), then the policy's field.
        The engine's score stands for rspamd's in that account's verdict, so
        the account's lists and threshold apply to either engine alike.
        StorageError when a policy cannot be read (451)."""
        if self.mode is not Mode.MX or not self.txn.routing.local:
            return None
        header = content.prefix if isinstance(content, Spooled) else content
        per_account = {
            account_id: with_engine(checked, filed.spam, filed.score)
            for account_id, filed in (engine or {}).items()
        }
        filings = await account_filings(
            self.ctx.storage,
            self.txn.routing.local.values(),
            checked,
            lambda: senders(mail_from, from_addresses(header)),
            dmarc_junk,
            per_account,
        )
        engine = engine or {}
        return {
            account_id: (
                f.mailbox,
                (engine[account_id].fields if account_id in engine else b"") + f.field,
            )
            for account_id, f in filings.items()
        }

    async def _spam_filing(
        self,
        queue_id: str,
        content: Message,
        results: AuthenticationResults,
        checked: Verdict,
        mailbox: str,
    ) -> dict[int, spamengine.Filing]:
        """The built-in anti-spam engine's filing of each local recipient's
        copy (delivery/spamengine.py): its mailbox and X-Spam-* fields, from
        the header rules, our own SPF/DKIM/DMARC results, the check stage's
        symbols (a DNS allow list's) and the account's Bayes classifier."""
        settings = self.ctx.settings
        auth = AuthVerdicts(
            spf=results.spf.result if results.spf else None,
            dkim=tuple(d.result for d in results.dkim),
            dmarc=results.dmarc.result if results.dmarc else None,
        )
        accounts = list(self.txn.routing.local.values())
        storage = self.ctx.storage
        untrained = all(spamengine.known_untrained(storage, a.id) for a in accounts)
        try:
            found = await spamengine.scan(content, auth, tokens=not untrained)
        except OSError as exc:  # the spool file unreadable: delivery will say so
            log.warning("%s: not scored for spam: %s", queue_id, exc)
            return {}
        filing: dict[int, spamengine.Filing] = {}
        for account in accounts:
            filed = await spamengine.file_for(
                storage, settings, account, found, checked.symbols, mailbox == "Junk"
            )
            filing[account.id] = filed
            if filed.mailbox == "Junk":
                log.info(
                    "%s: %s's copy to Junk, spam score %.2f", queue_id, account.address, filed.score
                )
        return filing

    async def _delivered_notice(self, queue_id: str, mail_from: str, content: Message) -> None:
        """RFC 3461 section 5.2.3: a "delivered" DSN to the sender for each
        recipient delivered here whose NOTIFY has SUCCESS, with the
        message's header only (RET applies to failures alone, section 4.3).
        The message is already committed: a failure here is logged."""
        from mtad.outbound.notices import send_delivered

        header = content.prefix if isinstance(content, Spooled) else content
        try:
            await send_delivered(
                self.ctx.storage,
                self.ctx.settings.server.hostname,
                mail_from,
                self.txn.dsn,
                self.txn.success_notices,
                header,
                settings=self.ctx.settings,
            )
        except StorageError as err:
            log.warning("%s: delivered notice not sent: %s", queue_id, err)

    async def _process_bounce(self, queue_id: str, content: bytes) -> None:
        """A null-sender message on the MX port may be an RFC 3464 report about
        mail we sent: mark the recipient hard/soft bounced (and suppress
        repeat offenders). The message itself is already delivered; a
        failure here only loses the bookkeeping."""
        from mtad.outbound.feedback import process_incoming_dsn

        try:
            await process_incoming_dsn(
                self.ctx.storage,
                content,
                suppress_after=self.ctx.settings.queue.suppress_after_hard_bounces,
            )
        except StorageError as err:
            log.warning("%s: DSN feedback failed: %s", queue_id, err)

    async def _tally_dmarc(self, queue_id: str, results: AuthenticationResults) -> None:
        """RFC 7489 section 7.2: counts this message's DMARC evaluation
        (source IP, header From, disposition, aligned and raw DKIM/SPF
        results) in the day's tally, when the policy domain's record asks
        for aggregate reports (``rua=``). Rejected messages count too. A
        failure here only loses the count."""
        from mtad.dmarcsend import tally_of
        from storage.sql.dmarcreports import DmarcReports

        seen = tally_of(results, self._client_ip)
        if seen is None:
            return
        try:
            await DmarcReports(self.ctx.storage.directory.db).count(seen)
        except StorageError as err:
            log.warning("%s: DMARC tally not counted: %s", queue_id, err)

    async def _process_reports(self, queue_id: str, content: bytes) -> None:
        """Reports to us on the MX port, recognised by their content: an RFC
        5965 complaint about mail we sent suppresses the recipient; an RFC
        7489 aggregate report (to any local recipient) is stored for
        ``mailctl dmarc``. The message itself is already delivered; a
        failure here only loses the bookkeeping."""
        from mtad.arf import looks_like_arf
        from mtad.dmarcagg import may_hold_report
        from mtad.outbound.feedback import process_incoming_arf, store_dmarc_reports

        header = content[: header_block_end(content)]
        try:
            if looks_like_arf(header):
                await process_incoming_arf(self.ctx.storage, content)
            elif may_hold_report(content):
                await store_dmarc_reports(self.ctx.storage, content)
        except StorageError as err:
            log.warning("%s: report feedback failed: %s", queue_id, err)


__all__ = ["Mode", "SmtpContext", "SmtpSession", "sender_allowed"]
