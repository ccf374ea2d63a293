"""One delivery attempt of one message to the recipients of one domain.

Contract: :func:`deliver_domain` never raises for anything the network or
the remote side does; it returns a :class:`RecipientResult` for every
recipient: ``delivered`` (the remote accepted responsibility, 2yz after the
final dot), ``deferred`` (try again later) or ``failed`` (permanent: bounce).
It walks the MX hosts in order and moves on to the next host (and the next
address of a host) on a connection failure or a 4yz reply, carrying only
the recipients still undecided (RFC 5321 section 5.1); a session to the
domain kept from the last seconds is tried first, without DNS lookups,
under the same TLS rules (see :func:`deliver_domain`). RFC 3461 DSN
parameters go on to a host that offers DSN, unchanged (section 5.2.1);
``RecipientResult.dsn_passed`` tells whether they did.

RFC 8689: a message with REQUIRETLS goes only to an MX host validated by
DNSSEC or an MTA-STS policy, reached with TLS whose certificate is
validated (DANE, else PKIX for the MX name, as an MTA-STS policy would)
and that offers REQUIRETLS, with REQUIRETLS on MAIL (section 4.2.1). A
validated host without REQUIRETLS fails the recipients at once (5.7.30);
no validated MX or TLS defers them (4.7.30) until the entry expires,
then they fail with 5.7.30 (section 5, the worker). A message with
"TLS-Required: No" (and no REQUIRETLS) ignores the recipient domain's
MTA-STS and DANE policies and goes out with opportunistic TLS (section
4.2.2); the local ``tls_policy`` levels still hold.

RFC 8460 section 3: a TLS-RPT report of ours (``DsnEnvelope.tls_report``)
is delivered "despite any TLS-related failures", and section 5.3: "sending
MTAs MUST NOT honor MTA-STS or DANE TLSA failures". It goes with
opportunistic TLS to every MX host (in clear if the handshake fails),
whatever the recipient domain's policies or a mandatory local level (only
``none`` holds: it forbids STARTTLS, it requires nothing); no policy is
looked up, so none of its sessions is recorded for the next report
("SHOULD NOT include this SMTP session in the next report").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from conf.settings import QueueSettings
from mtad.dns import DnsTemporaryError, Resolver
from mtad.outbound.client import ConnectionLost, Reply, SmtpClient, StaleSession, TlsFailed
from mtad.outbound.conncache import CachedSession, ConnectionCache, SessionKey, TlsIdentity
from mtad.outbound.dane import verify_chain
from mtad.outbound.mx import MailHost, NoRoute, NullMx, mail_exchangers
from mtad.outbound.tlspolicy import (
    OPPORTUNISTIC,
    DomainTls,
    HostTls,
    HostTlsError,
    TlsPolicy,
    certificate_result,
)
from storage.sql.queue import DEFERRED, DELIVERED, FAILED, NO_DSN, DsnEnvelope, DsnRecipient

log = logging.getLogger("mtad.outbound")

# RFC 5321 section 4.5.3.1.8: a server must accept at least 100 recipients
# per transaction; larger lists go in several transactions.
MAX_RCPTS_PER_TRANSACTION = 100
# How long a cached session may take to answer RSET before another is opened
# (as Postfix's smtp_rset_timeout); a peer gone silent must not stall mail.
RSET_TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True)
class DsnRequest:
    """The RFC 3461 parameters of one delivery: MAIL's (``envelope``) and
    each recipient's (``recipients``, by address)."""

    envelope: DsnEnvelope
    recipients: Mapping[str, DsnRecipient]
    tls_optional: bool = False  # "TLS-Required: No" (RFC 8689 section 4.2.2)

    @property
    def require_tls(self) -> bool:
        """REQUIRETLS (RFC 8689 section 4.1, where it also makes TLS-Required ignored)."""
        return self.envelope.require_tls

    @property
    def tls_report(self) -> bool:
        """A TLS-RPT report of ours (RFC 8460 section 3): opportunistic TLS only."""
        return self.envelope.tls_report

    def mail_params(self) -> list[str]:
        """RET and ENVID as the client gave them (RFC 3461 sections 4.3, 4.4)."""
        env = self.envelope
        return [p for p in (env.ret and f"RET={env.ret}", env.envid and f"ENVID={env.envid}") if p]

    def rcpt_params(self, address: str) -> list[str]:
        """NOTIFY and ORCPT as the client gave them (sections 4.1, 4.2)."""
        dsn = self.recipients.get(address, NO_DSN)
        return [
            p
            for p in (dsn.notify and f"NOTIFY={dsn.notify}", dsn.orcpt and f"ORCPT={dsn.orcpt}")
            if p
        ]


NO_REQUEST = DsnRequest(DsnEnvelope(), {})


@dataclass(frozen=True)
class RecipientResult:
    status: str  # delivered, deferred, failed
    reply: Reply
    remote_mta: str | None = None
    dsn_passed: bool = False  # the host offered DSN and got the RFC 3461 parameters

    @property
    def text(self) -> str:
        """As stored in the queue: the reply, and which host gave it."""
        return f"{self.reply} (host {self.remote_mta})" if self.remote_mta else str(self.reply)


def _verdict(reply: Reply) -> str:
    if reply.positive:
        return DELIVERED
    return DEFERRED if reply.transient else FAILED


def local_reply(code: int, enhanced: str, text: str) -> Reply:
    """A reply we make up ourselves (DNS, connection, policy failures)."""
    return Reply(code, (f"{enhanced} {text}",))


class HostFailure(Exception):
    """This host cannot take the message now: try the next one."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def needs_8bit(message: bytes) -> bool:
    """Any octet above 127 (``bytes.isascii`` runs in C: a 25 MB message
    takes milliseconds, where a Python loop over it held the loop ~2 s)."""
    return not message.isascii()


def header_needs_smtputf8(message: bytes) -> bool:
    """UTF-8 in the header section (RFC 6532 section 3: an internationalized
    message), which may travel only with SMTPUTF8 (RFC 6531 section 3.4)."""
    end = message.find(b"\r\n\r\n")
    return not (message if end < 0 else message[: end + 2]).isascii()


# RFC 8689 section 4.2.1 / RFC 5248: X.7.30 "REQUIRETLS support required".
REQUIRETLS_STATUS = "5.7.30"  # a validated host without REQUIRETLS: fails at once
REQUIRETLS_WAIT = "4.7.30"  # no host with validated TLS now: deferred


def requiretls_expired(last_reply: str | None) -> Reply | None:
    """The final reply of a REQUIRETLS recipient that expired while no host
    met REQUIRETLS (its last reply was ours, 4.7.30): 550 5.7.30 (RFC 8689
    section 5); None for any other last reply."""
    if last_reply is None or not last_reply.startswith(f"451 {REQUIRETLS_WAIT} "):
        return None
    reason = last_reply[len(f"451 {REQUIRETLS_WAIT} ") :]
    return local_reply(550, REQUIRETLS_STATUS, f"{reason}; delivery time expired")


def for_requiretls(tls: HostTls) -> HostTls:
    """The TLS a REQUIRETLS message needs from a host whose policy is ``tls``
    (RFC 8689 section 4.2.1 item 4: the certificate authenticated as RFC 6125
    or RFC 7672 says): DANE stays, anything weaker than an enforced PKIX
    verification becomes one."""
    if tls.level == "dane" or (tls.level == "verify" and not tls.report_only):
        return tls
    return HostTls("verify", f"REQUIRETLS ({tls.source})", policy_type=tls.policy_type)


def without_recipient_policy(tls: HostTls) -> HostTls:
    """RFC 8689 section 4.2.2: with "TLS-Required: No" the recipient domain's
    MTA-STS and DANE policies are ignored; opportunistic TLS remains."""
    if tls.policy_type in ("sts", "tlsa"):
        return HostTls("may", "TLS-Required: No")
    return tls


def tls_for_report(policy: TlsPolicy, domain: str) -> HostTls:
    """The TLS of a TLS-RPT report of ours to ``domain`` (RFC 8460 sections 3
    and 5.3): opportunistic, no policy looked up or honoured; a local level
    ``none`` still holds. OPPORTUNISTIC's policy type is "no-policy-found",
    so none of the report's sessions is recorded for the next report."""
    if policy.levels.get(domain.rstrip(".").lower()) == "none":
        return HostTls("none", "tls_policy none")
    return OPPORTUNISTIC


HEADER_SCAN_LIMIT = 256 * 1024


def tls_required_no(message: bytes) -> bool:
    """The header holds ``TLS-Required: No`` (RFC 8689 section 3, the value
    case-insensitive). Linear in the header, which is read up to
    HEADER_SCAN_LIMIT octets."""
    head = message[:HEADER_SCAN_LIMIT].replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    value: list[bytes] | None = None  # the parts of a TLS-Required field being read
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if value is not None:
                value.append(line)  # RFC 5322 section 2.2.3: unfold
            continue
        if value is not None and b"".join(value).strip().lower() == b"no":
            return True
        name, colon, rest = line.partition(b":")
        value = [rest] if colon and name.strip().lower() == b"tls-required" else None
    return value is not None and b"".join(value).strip().lower() == b"no"


def _is_ascii(text: str) -> bool:
    return text.isascii()


@dataclass
class Destination:
    """Everything a delivery to one domain needs besides the message."""

    resolver: Resolver
    settings: QueueSettings
    helo_name: str
    tls: TlsPolicy
    # Sessions kept between deliveries and the per-domain limit; by default
    # none: one session per delivery (the queue runner passes its own).
    connections: ConnectionCache = field(default_factory=ConnectionCache.disabled)


async def deliver_domain(
    dest: Destination,
    domain: str,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    dsn: DsnRequest = NO_REQUEST,
) -> dict[str, RecipientResult]:
    """Deliver ``message`` to ``recipients`` (all at ``domain``), with the
    DSN parameters of ``dsn`` where the host takes them.

    A session to ``domain`` kept from the last few seconds is tried first,
    before any MX or address lookup, as Postfix looks its connection cache
    up by the destination's name first: only if it answers RSET and the
    domain's policy, asked again now, gives its host the very TLS
    guarantee it was set up under. Recipients it leaves undecided (or all,
    if it fails) go the whole way: MX lookup, hosts in order."""
    domain_tls = None
    if dest.connections.idle_keys(domain) and not dsn.tls_report:  # a report: its own TLS
        domain_tls = await dest.tls.for_domain(dest.resolver, domain)
        cached = await _on_cached_session(
            dest, domain_tls, domain, sender, recipients, message, dsn
        )
        if cached is not None:
            decided = {r: v for r, v in cached.items() if v.status != DEFERRED}
            rest = [r for r in recipients if r not in decided]
            if not rest:
                return decided
            return decided | await _deliver_by_mx(
                dest, domain, sender, rest, message, dsn, domain_tls
            )
    return await _deliver_by_mx(dest, domain, sender, recipients, message, dsn, domain_tls)


async def _deliver_by_mx(
    dest: Destination,
    domain: str,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    dsn: DsnRequest,
    domain_tls: DomainTls | None,
) -> dict[str, RecipientResult]:
    """:func:`deliver_domain` through the domain's MX hosts, in order
    (``domain_tls``: its policy if already asked in this attempt)."""
    try:
        hosts = await mail_exchangers(dest.resolver, domain)
    except NullMx:
        # RFC 7505 section 4.2: fail at once, 550 5.1.10 recipient address has null MX.
        reply = local_reply(550, "5.1.10", f"domain {domain} accepts no mail (null MX)")
        return {r: RecipientResult(FAILED, reply) for r in recipients}
    except NoRoute:
        reply = local_reply(550, "5.1.2", f"domain {domain} has no mail exchanger")
        return {r: RecipientResult(FAILED, reply) for r in recipients}
    except DnsTemporaryError as exc:
        reply = local_reply(451, "4.4.3", f"DNS lookup for {domain} failed: {exc}")
        return {r: RecipientResult(DEFERRED, reply) for r in recipients}

    results: dict[str, RecipientResult] = {}  # decided: delivered or failed
    deferred: dict[str, RecipientResult] = {}  # the latest 4yz for each recipient
    pending = list(recipients)
    failure = local_reply(451, "4.4.1", f"no mail exchanger of {domain} answered")
    fixed_tls = tls_for_report(dest.tls, domain) if dsn.tls_report else None
    if domain_tls is None and fixed_tls is None:
        domain_tls = await dest.tls.for_domain(dest.resolver, domain)
    for host in hosts:
        if not pending:
            break
        try:
            tls = fixed_tls or await _host_tls(domain_tls, host, dsn)  # type: ignore[arg-type]
        except HostTlsError as exc:
            # RFC 8461 section 5 / RFC 7672 section 2.2: not this host, and
            # never in clear; the next host may do, else the mail waits.
            log.info("%s: %s", host.name, exc.text)
            # RFC 8689 section 5: under REQUIRETLS the wait ends in 5.7.30.
            status = REQUIRETLS_WAIT if dsn.require_tls else exc.enhanced
            failure = local_reply(451, status, exc.text)
            continue
        for address in host.addresses:
            try:
                outcome = await _deliver_host(
                    dest, domain, host, address, sender, pending, message, dsn, tls
                )
            except HostFailure as exc:
                log.info("%s [%s]: %s", host.name, address, exc.reply)
                failure = exc.reply
                if dsn.require_tls and exc.reply.enhanced.startswith("4.7."):
                    # RFC 8689 section 4.2.1: the host does not meet REQUIRETLS
                    # now (no TLS, certificate not validated): never sent;
                    # deferred (a certificate gets fixed, an attack ends), and
                    # bounced with 5.7.30 when the entry expires (section 5).
                    failure = local_reply(451, REQUIRETLS_WAIT, f"REQUIRETLS: {exc.reply.text}")
                continue  # the host's next address
            assert outcome is not None  # a new session is opened when none is cached
            for rcpt, result in outcome.items():
                if result.status == DEFERRED:
                    deferred[rcpt] = result
                else:
                    results[rcpt] = result
                    deferred.pop(rcpt, None)
            pending = [r for r in pending if r not in results]
            break  # this host answered; recipients it deferred try the next host
    for rcpt in pending:
        if rcpt in deferred:
            results[rcpt] = deferred[rcpt]
        elif failure.enhanced == REQUIRETLS_STATUS:
            results[rcpt] = RecipientResult(FAILED, failure)  # RFC 8689 section 5
        else:
            results[rcpt] = RecipientResult(DEFERRED, failure)
    return results


async def _host_tls(domain_tls: DomainTls, host: MailHost, dsn: DsnRequest) -> HostTls:
    """The TLS a delivery of ``dsn``'s message to ``host`` needs under the
    domain's policy; HostTlsError if the host must not be used."""
    try:
        tls = await domain_tls.for_host(host)
    except HostTlsError:
        if not (dsn.tls_optional and not dsn.require_tls):
            raise
        tls = OPPORTUNISTIC  # RFC 8689 section 4.2.2: the policy is ignored
    if dsn.require_tls:
        if not domain_tls.validates_mx(host):
            # RFC 8689 section 4.2.1 item 2: the MX must be validated by
            # DNSSEC or an MTA-STS policy; else it is not used (deferred,
            # 4.7.30, and 5.7.30 when the entry expires: section 5).
            raise HostTlsError(
                REQUIRETLS_WAIT,
                f"{host.name}: REQUIRETLS: MX of {domain_tls.domain} neither "
                "DNSSEC-validated nor listed by an MTA-STS policy",
            )
        return for_requiretls(tls)
    if dsn.tls_optional:
        return without_recipient_policy(tls)
    return tls


async def _on_cached_session(
    dest: Destination,
    domain_tls: DomainTls,
    domain: str,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    dsn: DsnRequest,
) -> dict[str, RecipientResult] | None:
    """The transaction on an idle session to ``domain`` (the most recent
    first) whose host gets, under the policy asked now, the same TLS
    guarantee the session was set up under; None if there is none, none
    answers RSET, or the host cannot take the message at all. No DNS
    lookup of the MX or its addresses: the session's own are used."""
    port = dest.settings.smtp_port
    for key in dest.connections.idle_keys(domain):
        host = MailHost(key.host, 0, (key.address,))
        try:
            tls = await _host_tls(domain_tls, host, dsn)
        except HostTlsError:
            continue
        if key != SessionKey(domain, key.host, key.address, port, TlsIdentity.of(tls)):
            continue
        try:
            outcome = await _deliver_host(
                dest,
                domain,
                host,
                key.address,
                sender,
                recipients,
                message,
                dsn,
                tls,
                reuse_only=True,
            )
        except HostFailure as exc:
            log.info("%s [%s]: %s", host.name, key.address, exc.reply)
            return None
        if outcome is not None:
            return outcome
    return None


async def _deliver_host(
    dest: Destination,
    domain: str,
    host: MailHost,
    address: str,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    dsn: DsnRequest,
    tls: HostTls = OPPORTUNISTIC,
    *,
    reuse_only: bool = False,
) -> dict[str, RecipientResult] | None:
    """One mail transaction with one host, with the TLS ``tls`` demands, on
    a cached session of the same destination and TLS guarantee (checked
    with RSET, RFC 5321 section 4.1.1.5, sent with the transaction's
    pipelined commands where the host offers PIPELINING) or a new one.
    HostFailure if the host cannot take the message at all (connection,
    greeting, TLS); else a result for each recipient. A cached session that
    fails its check is dropped and the next cached one taken, or a new one
    opened: not a failed attempt (``reuse_only``: None instead of a new
    session)."""
    cache = dest.connections
    key = SessionKey(domain, host.name, address, dest.settings.smtp_port, TlsIdentity.of(tls))
    async with cache.slot(domain):
        while True:
            session = cache.take(key)
            if session is None and reuse_only:
                return None
            # A taken session is checked by the RSET leading its transaction.
            reset_within = None if session is None else RSET_TIMEOUT_SECONDS
            if session is None:
                cache.opening(domain)
                try:
                    client = await _connect(dest, domain, host, address, tls, dsn.require_tls)
                except BaseException:
                    cache.failed_to_open(domain)
                    raise
                session = CachedSession(key, client)
            try:
                if dsn.require_tls and session.client.tls:
                    _check_requiretls(session.client, host)
                results = await _send(
                    session.client, host, sender, recipients, message, dsn, reset_within
                )
            except HostFailure:
                await cache.release(session)  # nothing was sent: the session is still good
                raise
            except StaleSession as exc:
                # RSET answered otherwise than 250 or not at all: nothing
                # was delivered; dropping the connection ends whatever of
                # the batch the server took (no message data was sent).
                log.debug("%s: %s; opening another", key.host, exc)
                cache.drop(session)
                continue
            except ConnectionLost as exc:
                cache.drop(session)
                raise HostFailure(local_reply(451, "4.4.2", f"{host.name}: {exc}")) from exc
            except BaseException:
                cache.drop(session)
                raise
            session.messages += 1
            # RFC 5321 section 3.8: after a 421 the server closes the channel.
            reusable = all(r.reply.code != 421 for r in results.values())
            await cache.release(session, reusable=reusable)
            return results


def _check_requiretls(client: SmtpClient, host: MailHost) -> None:
    """RFC 8689 section 4.2.1 item 5: the host must offer REQUIRETLS."""
    if "REQUIRETLS" not in client.extensions:
        raise HostFailure(
            local_reply(550, REQUIRETLS_STATUS, f"{host.name} does not offer REQUIRETLS")
        )


async def _connect(
    dest: Destination,
    domain: str,
    host: MailHost,
    address: str,
    tls: HostTls,
    require_tls: bool,
) -> SmtpClient:
    """A new session with one host, greeted and with TLS as ``tls`` demands,
    ready for MAIL. HostFailure if the host cannot be used (connection,
    greeting, TLS, REQUIRETLS not offered). After a failed handshake in
    opportunistic mode the host is tried again in plaintext (RFC 7435
    section 6); in MTA-STS testing mode, again without verification (RFC
    8461 section 5). A second try follows a failure already recorded for
    TLS-RPT and is not counted as a successful session."""
    settings = dest.settings
    plaintext = retry = False
    while True:
        try:
            client = await SmtpClient.open(
                address,
                settings.smtp_port,
                connect_timeout=settings.connect_timeout_seconds,
                timeout=settings.command_timeout_seconds,
            )
        except ConnectionLost as exc:
            raise HostFailure(local_reply(451, "4.4.1", f"{host.name}: {exc}")) from exc
        try:
            greeting = client.greeting
            if greeting is None or greeting.code != 220:
                # RFC 5321 section 3.1: a 554 greeting means "no service here": next host.
                raise HostFailure(greeting or local_reply(451, "4.4.2", "no greeting"))
            reply = await client.ehlo(dest.helo_name)
            if reply.code != 250:
                raise HostFailure(reply)
            if "STARTTLS" in client.extensions and not plaintext and tls.level != "none":
                try:
                    reply = await _starttls(dest, domain, host, client, tls)
                except TlsFailed:
                    client.abort()
                    if tls.report_only:
                        # RFC 8461 section 5: testing mode delivers all the same.
                        tls, retry = OPPORTUNISTIC, True
                        continue
                    log.info("%s: TLS handshake failed, retrying in plaintext", host.name)
                    tls, plaintext, retry = OPPORTUNISTIC, True, True
                    continue
                if reply.code == 220:
                    reply = await client.ehlo(dest.helo_name)
                    if reply.code != 250:
                        raise HostFailure(reply)
                elif tls.mandatory:
                    raise HostFailure(reply)
            if require_tls and client.tls:
                _check_requiretls(client, host)
            if tls.level in ("encrypt", "verify", "dane") and not client.tls:
                detail = f"{host.name}: {tls.source}: TLS required, not offered"
                if tls.policy_type != "no-policy-found":
                    await dest.tls.reports.record(
                        domain, host.name, tls, "starttls-not-supported", detail
                    )
                if tls.mandatory:
                    raise HostFailure(local_reply(451, "4.7.4", detail))
            if client.tls and not retry and tls.policy_type != "no-policy-found":
                # RFC 8460 section 4.4: counted in total-successful-session-count
                # (sessions under an MTA-STS or DANE policy: one line each).
                await dest.tls.reports.record_success(domain, host.name, tls)
            return client
        except ConnectionLost as exc:
            await client.quit()
            raise HostFailure(local_reply(451, "4.4.2", f"{host.name}: {exc}")) from exc
        except BaseException:
            await client.quit()
            raise


async def _starttls(
    dest: Destination, domain: str, host: MailHost, client: SmtpClient, tls: HostTls
) -> Reply:
    """STARTTLS as ``tls`` demands. Raises TlsFailed where an opportunistic
    or report-only connection may go on without (the connection is then
    unusable), HostFailure where the host must not be used."""
    if tls.level == "verify":
        context, name = dest.tls.verified, host.name  # PKIX, the MX host's name
    elif tls.level == "dane":
        # RFC 7672 section 8.1: SNI is the TLSA base domain; the TLSA records,
        # not the certificate store, decide (checked below).
        context, name = dest.tls.opportunistic, host.name
    else:
        context, name = dest.tls.opportunistic, None
    try:
        reply = await client.starttls(context, name)
    except TlsFailed as exc:
        if tls.policy_type != "no-policy-found":
            await dest.tls.reports.record(
                domain, host.name, tls, certificate_result(str(exc)), str(exc)
            )
        if tls.mandatory:
            raise HostFailure(
                local_reply(451, "4.7.5", f"{host.name}: {tls.source}: TLS failed: {exc}")
            ) from exc
        raise
    if tls.level == "dane" and client.tls:
        why = verify_chain(tls.records, client.peer_chain(), host.name)
        if why is not None:
            # RFC 8460 section 4.3: a certificate no TLSA record matches is
            # tlsa-invalid (4.3.2.1), not the catch-all validation-failure
            # (4.3.3); DANE-TA name, date and chain failures are 4.3.1's.
            await dest.tls.reports.record(domain, host.name, tls, why.result_type, why.text)
            client.abort()
            # RFC 7672 section 2.2: a host whose TLSA records match nothing is not used.
            raise HostFailure(local_reply(451, "4.7.5", f"{host.name}: DANE: {why}"))
    return reply


async def _send(
    client: SmtpClient,
    host: MailHost,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    dsn: DsnRequest,
    reset_within: float | None = None,
) -> dict[str, RecipientResult]:
    """The message's transactions on ``client`` (one per
    MAX_RCPTS_PER_TRANSACTION recipients); ``reset_within``: a reused
    session, whose first transaction opens with its RSET check
    (:meth:`SmtpClient.transaction`; StaleSession if it fails)."""
    ext = client.extensions
    params: list[str] = []

    def every(reply: Reply) -> dict[str, RecipientResult]:
        return {r: RecipientResult(_verdict(reply), reply, host.name) for r in recipients}

    limit = ext.size_limit
    if limit is not None and len(message) > limit:
        # RFC 1870 section 6.2: do not send what the server will refuse.
        return every(local_reply(552, "5.3.4", f"message exceeds {host.name}'s limit of {limit}"))
    if "SIZE" in ext:
        params.append(f"SIZE={len(message)}")
    ascii_envelope = _is_ascii(sender) and all(_is_ascii(r) for r in recipients)
    if not ascii_envelope or header_needs_smtputf8(message):
        if "SMTPUTF8" not in ext and not ascii_envelope:
            # RFC 6531 section 3.2: no downgrade of addresses; permanent failure.
            return every(local_reply(553, "5.6.7", f"{host.name} does not support SMTPUTF8"))
        if "SMTPUTF8" not in ext:
            # RFC 6531 section 3.7.4 (X.6.9): a UTF-8 header message cannot be
            # sent to a server without SMTPUTF8, and we do not downgrade it.
            return every(
                local_reply(550, "5.6.9", f"{host.name} does not accept UTF-8 headers (SMTPUTF8)")
            )
        params.append("SMTPUTF8")
    if needs_8bit(message):
        if "8BITMIME" not in ext:
            # RFC 6152 section 3: 8-bit data only to a server offering 8BITMIME.
            # We do not downgrade (it would break the DKIM signature): permanent.
            return every(
                local_reply(554, "5.6.3", f"{host.name} does not accept 8-bit data (8BITMIME)")
            )
        params.append("BODY=8BITMIME")
    if dsn.require_tls:
        params.append("REQUIRETLS")  # RFC 8689 section 2: the MAIL parameter; 4.2.1 items 1-5 held
    # RFC 3461 section 5.2.1: to a host offering DSN, the parameters unchanged.
    passed = "DSN" in ext
    rcpt_params: dict[str, list[str]] = {}
    if passed:
        params += dsn.mail_params()
        rcpt_params = {r: dsn.rcpt_params(r) for r in recipients}
    results: dict[str, RecipientResult] = {}
    for start in range(0, len(recipients), MAX_RCPTS_PER_TRANSACTION):
        batch = list(recipients[start : start + MAX_RCPTS_PER_TRANSACTION])
        txn = await client.transaction(
            sender, batch, message, params, rcpt_params, reset_within=reset_within
        )
        reset_within = None
        for rcpt in batch:
            reply = txn.outcome(rcpt)
            results[rcpt] = RecipientResult(_verdict(reply), reply, host.name, passed)
    return results
