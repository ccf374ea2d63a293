"""Client autoconfiguration: mail clients set up an account from its address.

- Thunderbird (and K-9, Evolution, ...): ``GET /mail/config-v1.1.xml`` and
  ``GET /.well-known/autoconfig/mail/config-v1.1.xml``, optionally with
  ``?emailaddress=``, answered in the clientConfig v1.1 format.
- Outlook: ``POST /autodiscover/autodiscover.xml`` (the "POX" request with
  ``<EMailAddress>``), answered with the Outlook response schema 2006a.
- Apple Mail / iOS: ``GET /apple/mobileconfig?emailaddress=``, an unsigned
  configuration profile (plist) with one ``com.apple.mail.managed`` payload.

Everything is generated from ``server.hostname`` and the listeners actually
configured (:func:`offered`): a listener with no address, bound to port 0
or to loopback only is off and never advertised. Values are escaped by the
XML and plist writers, never pasted into markup. A malformed address, or
one whose domain this site does not serve, gets 400; an unreachable
directory gets the API's 503.
"""

from __future__ import annotations

import ipaddress
import plistlib
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from aiohttp import web

from conf.settings import Settings
from httpapi.context import context

routes = web.RouteTableDef()

MAX_REQUEST_BODY = 16 * 1024  # an autodiscover request is a few hundred bytes
# local-part@domain: no space, quote, bracket or separator; an LDH domain.
_ADDRESS = re.compile(
    r"[^@\s<>\"(),;:\\\[\]]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
)
_OUTLOOK_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
_OUTLOOK_RESPONSE_NS = (
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
)
_AUTODISCOVER_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One way in: protocol ("imap", "pop3", "smtp"), port, and "SSL"
    (implicit TLS, RFC 8314) or "STARTTLS"."""

    protocol: str
    port: int
    socket: str


def _port(listen: list[str]) -> int | None:
    """The port of the first listener reachable from elsewhere, or None."""
    for value in listen:
        host, _, port = value.rpartition(":")
        host = host.strip("[]")
        if not port.isdigit() or int(port) == 0:
            continue
        if host == "localhost":
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass  # a host name: reachable as far as we can tell
        return int(port)
    return None


def offered(settings: Settings) -> list[Endpoint]:
    """The endpoints to advertise, preferred first within each protocol
    (implicit TLS before STARTTLS, RFC 8314 section 3)."""
    candidates = [
        ("imap", settings.imap.tls_listen, "SSL"),
        ("imap", settings.imap.listen, "STARTTLS"),
        ("pop3", settings.pop3.tls_listen, "SSL"),
        ("pop3", settings.pop3.listen, "STARTTLS"),
        ("smtp", settings.smtp.submissions_listen, "SSL"),
        ("smtp", settings.smtp.submission_listen, "STARTTLS"),
    ]
    out = []
    for protocol, listen, socket in candidates:
        port = _port(listen)
        if port is not None:
            out.append(Endpoint(protocol, port, socket))
    return out


def _bad(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=reason + "\n", content_type="text/plain")


async def _checked_address(request: web.Request, raw: str | None) -> str | None:
    """``raw`` as a lower-case-domain address of a domain this site serves;
    None when no address was given; 400 when malformed or not ours."""
    if raw is None:
        return None
    raw = raw.strip()
    if len(raw) > 254 or not _ADDRESS.fullmatch(raw):
        raise _bad("emailaddress is not an e-mail address")
    local, _, domain = raw.rpartition("@")
    domain = domain.lower()
    if not await context(request).storage.directory.is_local_domain(domain):
        raise _bad("this server does not serve that domain")
    return f"{local}@{domain}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _xml(root: ET.Element) -> bytes:
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def client_config(settings: Settings, address: str | None, domains: list[str]) -> bytes:
    """The clientConfig v1.1 document (Thunderbird's autoconfig format).
    Without an address the username is Thunderbird's %EMAILADDRESS%
    placeholder and every served domain is listed."""
    host = settings.server.hostname
    domain = address.rpartition("@")[2] if address else (domains[0] if domains else host)
    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider", id=domain)
    for d in [domain] if address else domains or [domain]:
        _sub(provider, "domain", d)
    _sub(provider, "displayName", host)
    _sub(provider, "displayShortName", domain)
    username = address or "%EMAILADDRESS%"
    for ep in offered(settings):
        tag = "outgoingServer" if ep.protocol == "smtp" else "incomingServer"
        server = _sub(provider, tag, type=ep.protocol)
        _sub(server, "hostname", host)
        _sub(server, "port", str(ep.port))
        _sub(server, "socketType", ep.socket)
        _sub(server, "authentication", "password-cleartext")
        _sub(server, "username", username)
    return _xml(root)


def autodiscover_response(settings: Settings, address: str) -> bytes:
    """Outlook's POX autodiscover answer: one Protocol per advertised
    endpoint kind (the preferred one of IMAP, POP3 and SMTP each)."""
    root = ET.Element("Autodiscover", xmlns=_AUTODISCOVER_NS)
    response = _sub(root, "Response", xmlns=_OUTLOOK_RESPONSE_NS)
    account = _sub(response, "Account")
    _sub(account, "AccountType", "email")
    _sub(account, "Action", "settings")
    seen: set[str] = set()
    for ep in offered(settings):
        if ep.protocol in seen:
            continue
        seen.add(ep.protocol)
        proto = _sub(account, "Protocol")
        _sub(proto, "Type", {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP"}[ep.protocol])
        _sub(proto, "Server", settings.server.hostname)
        _sub(proto, "Port", str(ep.port))
        _sub(proto, "DomainRequired", "off")
        _sub(proto, "LoginName", address)
        _sub(proto, "SPA", "off")
        _sub(proto, "SSL", "on")
        _sub(proto, "Encryption", "SSL" if ep.socket == "SSL" else "TLS")
        _sub(proto, "AuthRequired", "on")
        if ep.protocol == "smtp":
            _sub(proto, "UsePOPAuth", "on")
    return _xml(root)


def mobileconfig(settings: Settings, address: str) -> bytes | None:
    """An unsigned Apple configuration profile with one mail account
    payload (IMAP, else POP3, with SMTP); None without incoming or
    outgoing endpoints. UUIDs derive from host and address, so a second
    download replaces the first profile rather than adding another."""
    eps = offered(settings)
    incoming = next((e for e in eps if e.protocol == "imap"), None) or next(
        (e for e in eps if e.protocol == "pop3"), None
    )
    outgoing = next((e for e in eps if e.protocol == "smtp"), None)
    if incoming is None or outgoing is None:
        return None
    host = settings.server.hostname
    ident = ".".join(reversed(host.split("."))) + ".mail"
    seed = f"shardmail:{host}:{address}"
    account = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.account",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, seed + ":account")).upper(),
        "PayloadDisplayName": address,
        "EmailAccountDescription": address,
        "EmailAccountType": "EmailTypeIMAP" if incoming.protocol == "imap" else "EmailTypePOP",
        "EmailAddress": address,
        "IncomingMailServerHostName": host,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerUsername": address,
        "OutgoingMailServerHostName": host,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerUsername": address,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": ident,
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, seed)).upper(),
        "PayloadDisplayName": f"{address} ({host})",
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile)


@routes.get("/mail/config-v1.1.xml", name="autoconfig")
@routes.get("/.well-known/autoconfig/mail/config-v1.1.xml", name="autoconfig_well_known")
async def thunderbird(request: web.Request) -> web.Response:
    ctx = context(request)
    address = await _checked_address(request, request.query.get("emailaddress"))
    domains = [] if address else [d.name for d in await ctx.storage.directory.list_domains()]
    body = client_config(ctx.settings, address, domains)
    return web.Response(body=body, content_type="application/xml", charset="utf-8")


def _request_address(body: bytes) -> str:
    """The EMailAddress of an Outlook POX request; 400 if there is none.
    No DTD is accepted, so no entity can expand (billion laughs)."""
    if b"<!" in body:
        raise _bad("DTDs, comments and CDATA are not accepted")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise _bad("the request is not XML") from None
    el = root.find(f"{{{_OUTLOOK_REQUEST_NS}}}Request/{{{_OUTLOOK_REQUEST_NS}}}EMailAddress")
    if el is None:
        el = root.find("Request/EMailAddress")  # no namespace: some clients omit it
    if el is None or not el.text:
        raise _bad("the request names no EMailAddress")
    return el.text


@routes.post("/autodiscover/autodiscover.xml", name="autodiscover")
@routes.post("/Autodiscover/Autodiscover.xml", name="autodiscover_capitalised")
async def outlook(request: web.Request) -> web.Response:
    ctx = context(request)
    if request.content_length is not None and request.content_length > MAX_REQUEST_BODY:
        raise _bad("request too large")
    body = await request.content.read(MAX_REQUEST_BODY + 1)
    if len(body) > MAX_REQUEST_BODY:
        raise _bad("request too large")
    address = await _checked_address(request, _request_address(body))
    assert address is not None
    return web.Response(
        body=autodiscover_response(ctx.settings, address),
        content_type="application/xml",
        charset="utf-8",
    )


@routes.get("/apple/mobileconfig", name="mobileconfig")
async def apple(request: web.Request) -> web.Response:
    ctx = context(request)
    raw = request.query.get("emailaddress")
    if raw is None:
        raise _bad("emailaddress is required")
    address = await _checked_address(request, raw)
    assert address is not None
    body = mobileconfig(ctx.settings, address)
    if body is None:
        raise web.HTTPNotFound(text="no IMAP/POP3 and submission listener is enabled\n")
    return web.Response(
        body=body,
        content_type="application/x-apple-aspen-config",
        headers={"Content-Disposition": 'attachment; filename="mail.mobileconfig"'},
    )
