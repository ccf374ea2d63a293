"""Any-state and not-authenticated commands: CAPABILITY, NOOP, LOGOUT, ID,
ENABLE, STARTTLS, LOGIN, AUTHENTICATE (RFC 3501 sections 6.1 and 6.2,
RFC 2971, RFC 5161, RFC 4959)."""

from __future__ import annotations

import base64
import binascii
import logging

from imapd.imap.session import Reply, Session, State, bad, no, ok
from imapd.imap.wire import encode
from imapd.imap.wire.commands import Authenticate, Command, Enable, Id, Login
from runtime.metrics import AUTH_FAILURES
from storage.throttle import LoginClient

log = logging.getLogger("imapd.imap")

# RFC 5161 section 4 / RFC 7162 section 3.2.3: what ENABLE can turn on.
# RFC 9051 section 2.1 / 6.3.1: ENABLE IMAP4rev2 switches a session that
# also has IMAP4rev1 to rev2 rules (Session.rev2).
ENABLEABLE = frozenset({"CONDSTORE", "QRESYNC", "IMAP4REV2", "UTF8=ACCEPT"})
_SPELLING = {"IMAP4REV2": "IMAP4rev2"}


async def handle_capability(s: Session, cmd: Command) -> Reply:
    s.write(encode.capability_line(s.capabilities()))
    return ok("CAPABILITY completed")


async def handle_noop(s: Session, cmd: Command) -> Reply:
    # RFC 3501 section 6.1.2: NOOP is the polling point for updates.
    if s.selected is not None:
        await s.sync(poll=True)
    return ok("NOOP completed")


async def handle_logout(s: Session, cmd: Command) -> Reply | None:
    s.untagged("BYE Logging out")
    s.tagged(cmd.tag, ok("LOGOUT completed"))
    s.state = State.LOGOUT
    return None


async def handle_id(s: Session, cmd: Id) -> Reply:
    # RFC 2971 section 3.3: tell our name; the client's is only logged.
    if cmd.params:
        log.debug("IMAP client id from %s: %s", s.conn.peer, dict(cmd.params))
    s.untagged('ID ("name" "shardmail" "vendor" "shardmail")')
    return ok("ID completed")


async def handle_enable(s: Session, cmd: Enable) -> Reply:
    newly = [c for c in cmd.capabilities if c in ENABLEABLE and c not in s.enabled]
    if "QRESYNC" in newly and "CONDSTORE" not in s.enabled:
        newly.append("CONDSTORE")  # RFC 7162 section 3.2.3: QRESYNC implies CONDSTORE
    s.enabled.update(newly)
    if "CONDSTORE" in s.enabled:
        s.condstore = True
    s.untagged("ENABLED" + "".join(" " + _SPELLING.get(c, c) for c in newly))
    return ok("ENABLE completed")


async def handle_starttls(s: Session, cmd: Command) -> Reply | None:
    if s.conn.is_tls:
        return bad("TLS is already active")
    if s.ctx.tls is None:
        return no("TLS is not available")
    s.tagged(cmd.tag, ok("Begin TLS negotiation now"))
    await s.conn.drain()
    try:
        await s.conn.start_tls(s.ctx.tls)
    except (OSError, ConnectionError) as exc:
        log.info("STARTTLS handshake with %s failed: %s", s.conn.peer, exc)
        raise ConnectionResetError("TLS handshake failed") from exc
    return None


def _client(s: Session) -> LoginClient:
    """The client as the login gate sees it; ``gone`` once the connection closed."""

    def gone() -> bool:
        transport = getattr(s.conn, "transport", None)
        return transport is None or transport.is_closing()

    return LoginClient(s.conn.peer, gone)


def _failed_login(s: Session) -> Reply:
    """The reply to a refused login, already counted and delayed by the gate."""
    s.login_failures += 1
    AUTH_FAILURES.inc(protocol="imap")
    limit = int(s.ctx.setting("auth", "max_failures_per_connection", 5))  # type: ignore[arg-type]
    if s.login_failures >= limit:
        s.untagged("BYE Too many failed logins")
        s.state = State.LOGOUT
    return no("Authentication failed", "AUTHENTICATIONFAILED")


async def _check_login(s: Session, login: str, password: str) -> Reply:
    # An unreachable directory or a client with too many checks queued raises
    # TEMPORARY: the session answers NO [UNAVAILABLE] (RFC 5530 section 3).
    account = await s.ctx.logins.authenticate(s.storage.directory, login, password, _client(s))
    if account is None:
        return _failed_login(s)
    await s.log_in(account)
    return ok("Logged in", "CAPABILITY " + " ".join(s.capabilities()))


async def handle_login(s: Session, cmd: Login) -> Reply:
    if s.login_disabled:
        # RFC 3501 section 6.2.3 LOGINDISABLED; RFC 5530 PRIVACYREQUIRED.
        return no("Plaintext login is disabled until STARTTLS", "PRIVACYREQUIRED")
    return await _check_login(s, cmd.username, cmd.password)


async def handle_authenticate(s: Session, cmd: Authenticate) -> Reply:
    if cmd.mechanism != "PLAIN":
        return no(f"Unsupported mechanism {cmd.mechanism[:20]}", "CANNOT")
    if s.login_disabled:
        return no("Plaintext authentication is disabled until STARTTLS", "PRIVACYREQUIRED")
    response = cmd.initial_response
    if response is None:
        s.write(b"+ \r\n")  # RFC 3501 section 6.2.2: empty challenge for PLAIN
        await s.conn.drain()
        response = await s.read_continuation(s.autologout)
        if response is None:
            raise ConnectionResetError("client went away")
        if response.strip() == b"*":
            return bad("Authentication cancelled")
    if response == b"=":  # RFC 4959 section 3: "=" is an empty initial response
        response = b""
    try:
        decoded = base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        return bad("Invalid base64")
    # RFC 4616: [authzid] NUL authcid NUL passwd
    parts = decoded.split(b"\0")
    if len(parts) != 3:
        return bad("Malformed PLAIN response")
    authzid, authcid, password = (p.decode("utf-8", "replace") for p in parts)
    if authzid and authzid.lower() != authcid.lower():
        await s.ctx.logins.refused(authcid, _client(s))
        _failed_login(s)
        return no("Proxy authorization is not allowed", "AUTHORIZATIONFAILED")
    return await _check_login(s, authcid, password)
