"""Anti-spam through rspamd: its HTTP protocol and the check stage's check.

The protocol (rspamd's "protocol" documentation, checkv2): the message is
the body of ``POST /checkv2``; the envelope goes in request header fields:
``IP`` (the client's address), ``Helo``, ``From`` (the envelope sender),
one ``Rcpt`` per recipient, ``User`` (the authenticated sender, which
rspamd treats as outgoing mail), ``Hostname`` (the client's name, unknown
here: we do no reverse lookup of our own) and ``Queue-Id``. rspamd answers
JSON: ``action`` (one of its six actions), ``score``, ``required_score``
(its reject score), ``symbols`` (name -> score, options) and ``messages``
(``smtp_message``: the text to give the client).

rspamd takes no header field for SPF, DKIM or DMARC results computed
elsewhere (its own modules compute them, through its own resolver), and
the MX computes ours after the check stage: none are sent, so rspamd's
spf/dkim/dmarc modules should stay on where it can reach DNS.

One :class:`RspamdClient` per event loop and address (:func:`client_for`):
one aiohttp session whose connections are kept alive and reused by every
check. Every request has one deadline (``timeout``) covering connect,
send and reply. A spooled message is streamed from its file with its
length announced (rspamd reads a Content-Length body), never copied whole.

Actions (:func:`verdict_for`): ``reject`` is 550 5.7.1 with rspamd's
message (RFC 5321 section 4.2.5: the reply to the end of DATA; RFC 3463
section 3.8, X.7.1 delivery not authorized); ``soft reject`` and
``greylist`` are 451 4.7.1 (greylisting is rspamd's: it asks the sender
to come back, which is a temporary failure); ``add header`` and ``rewrite
subject`` deliver to Junk (the subject is not rewritten: the message is
kept byte-exact, and Junk says it better); ``no action`` delivers. Every
verdict carries the ``X-Spam-*`` fields (:func:`spam_headers`) and the
score, which a recipient's own Junk threshold may file by instead
(delivery/acctpolicy.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from conf.settings import Settings
from delivery.checks import Action, Subject, Verdict, printable
from delivery.checks_clamd import ClamdError, message_chunks
from delivery.spool import Message, Spooled

log = logging.getLogger("delivery.rspamd")

CHUNK_SIZE = 256 * 1024
REPLY_MAX = 4 * 1024 * 1024  # a checkv2 answer is JSON of its symbols
TEXT_MAX = 200  # rspamd's message, shown in an SMTP reply
SYMBOL_MAX = 200  # one symbol as shown in X-Spam-Symbols
LINE_SOFT = 78  # RFC 5322 section 2.1.1: SHOULD be no more than 78 characters
LINE_MAX = 998  # ...and MUST be no more than 998

# RFC 3463 section 3.8: X.7.1 delivery not authorized, message refused.
SPAM_REJECT = (550, "5.7.1", "Message refused as spam")
SPAM_SOFT_REJECT = (451, "4.7.1", "Message deferred by the spam filter, try again later")
GREYLISTED = (451, "4.7.1", "Greylisted, try again later")
FILTER_UNAVAILABLE = (451, "4.7.1", "Spam filter unavailable, try again later")

SPAM_ACTIONS = frozenset({"reject", "soft reject", "rewrite subject", "add header"})
KNOWN_ACTIONS = SPAM_ACTIONS | {"greylist", "no action"}


class RspamdError(Exception):
    """rspamd gave no usable answer; ``str(err)`` is for the log."""


@dataclass(frozen=True)
class RspamdResult:
    """What rspamd said of one message."""

    action: str
    score: float
    required: float
    symbols: tuple[tuple[str, float], ...] = ()
    message: str = ""  # rspamd's smtp_message, if any

    @classmethod
    def parse(cls, raw: bytes) -> RspamdResult:
        """A checkv2 answer; RspamdError for anything else."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RspamdError(f"rspamd answered no JSON: {raw[:80]!r}") from exc
        if not isinstance(data, dict):
            raise RspamdError("rspamd answered no JSON object")
        action = data.get("action")
        if action not in KNOWN_ACTIONS:
            raise RspamdError(f"rspamd answered an unknown action {str(action)[:40]!r}")
        score, required = _number(data.get("score")), _number(data.get("required_score"))
        raw_symbols = data.get("symbols")
        symbols: list[tuple[str, float]] = []
        if isinstance(raw_symbols, Mapping):
            for name, info in raw_symbols.items():
                value = info.get("score") if isinstance(info, Mapping) else None
                symbols.append((str(name), _number(value)))
        messages = data.get("messages")
        text = messages.get("smtp_message", "") if isinstance(messages, Mapping) else ""
        return cls(action, score, required, tuple(symbols), str(text))


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


def fold(name: str, items: Sequence[str], separator: str = ",") -> bytes:
    """``name: item1, item2, ...`` as a header field (ending in CRLF),
    folded before an item wherever the line would pass LINE_SOFT
    (RFC 5322 section 2.2.3: folding is a CRLF before white space); no
    line passes LINE_MAX (section 2.1.1) as long as each item is shorter
    than LINE_MAX - 2."""
    lines: list[str] = []
    line = f"{name}:"
    for index, item in enumerate(items):
        piece = item + (separator if index < len(items) - 1 else "")
        if len(line) + 1 + len(piece) > LINE_SOFT and line.strip() and line != f"{name}:":
            lines.append(line)
            line = ""
        line += " " + piece
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def spam_headers(result: RspamdResult) -> bytes:
    """``X-Spam-Score``, ``X-Spam-Status`` and ``X-Spam-Symbols`` for
    ``result`` (:func:`spam_fields`): spam when rspamd's action is a spam one."""
    return spam_fields(
        result.action in SPAM_ACTIONS, result.score, result.required, result.action,
        result.symbols,
    )  # fmt: skip


def spam_fields(
    spam: bool, score: float, required: float, action: str, symbols: Sequence[tuple[str, float]]
) -> bytes:
    """The ``X-Spam-*`` fields every engine writes (rspamd's and the built-in
    one): Status is Yes for ``spam``, with the score, the score that makes
    spam and the action taken; Symbols lists each symbol with its score, by
    name (none: no Symbols field)."""
    status = "Yes" if spam else "No"
    listed = sorted(
        printable(f"{name}({value:.2f})", SYMBOL_MAX).replace(" ", "_") for name, value in symbols
    )
    return (
        f"X-Spam-Score: {score:.2f}\r\n"
        f"X-Spam-Status: {status}, score={score:.2f} required={required:.2f}"
        f" action={action.replace(' ', '_')}\r\n"
    ).encode("ascii") + (fold("X-Spam-Symbols", listed) if listed else b"")


def verdict_for(result: RspamdResult, name: str = "antispam") -> Verdict:
    """The check stage's verdict for rspamd's action (module docstring)."""
    headers = spam_headers(result)
    text = printable(result.message, TEXT_MAX)
    if result.action == "reject":
        code, enhanced, default = SPAM_REJECT
        return Verdict(Action.REJECT, (code, enhanced, text or default), headers, name)
    if result.action == "soft reject":
        code, enhanced, default = SPAM_SOFT_REJECT
        return Verdict(Action.TEMPFAIL, (code, enhanced, text or default), headers, name)
    if result.action == "greylist":
        return Verdict(Action.TEMPFAIL, GREYLISTED, headers, name)
    if result.action in SPAM_ACTIONS:
        return Verdict(Action.QUARANTINE, None, headers, name, result.score)
    return Verdict(Action.ACCEPT, None, headers, name, result.score)


def _header_value(value: str) -> str:
    """An envelope value as an HTTP header field value: no control characters
    (aiohttp refuses CR and LF; nothing else of ours can hold them)."""
    return "".join(ch for ch in value if ch >= " " and ch != "\x7f")


def envelope_headers(subject: Subject, queue_id: str = "") -> CIMultiDict[str]:
    """The request header fields carrying ``subject``'s envelope."""
    headers: CIMultiDict[str] = CIMultiDict()
    if subject.client_ip:
        headers["IP"] = _header_value(subject.client_ip)
    if subject.helo:
        headers["Helo"] = _header_value(subject.helo)
    headers["From"] = _header_value(subject.mail_from)  # empty: the null sender
    for rcpt in subject.recipients:
        headers.add("Rcpt", _header_value(rcpt))
    if subject.account:
        headers["User"] = _header_value(subject.account)
    if queue_id:
        headers["Queue-Id"] = _header_value(queue_id)
    return headers


async def _body(message: Message) -> AsyncIterator[bytes]:
    try:
        async for chunk in message_chunks(message, CHUNK_SIZE):
            yield bytes(chunk)
    except ClamdError as exc:  # the spool file ended early
        raise RspamdError(str(exc)) from exc


def message_size(message: Message) -> int:
    return message.size if isinstance(message, Spooled) else len(message)


async def _read_body(reply: aiohttp.ClientResponse, url: str) -> bytes:
    """The whole answer, at most REPLY_MAX octets (RspamdError past it)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await reply.content.read(REPLY_MAX + 1 - size):
        parts.append(chunk)
        size += len(chunk)
        if size > REPLY_MAX:
            raise RspamdError(f"{url}: answer too long")
    return b"".join(parts)


class RspamdClient:
    """Talks to one rspamd (its normal worker at ``url``, its controller at
    ``controller_url``) over one aiohttp session of the running loop."""

    def __init__(
        self, url: str, timeout: float, controller_url: str = "", password: str = ""
    ) -> None:
        self.url = url.rstrip("/")
        self.controller_url = controller_url.rstrip("/")
        self.password = password
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                raise_for_status=False,
                auto_decompress=False,
            )
        return self._session

    async def _post(self, url: str, message: Message, headers: CIMultiDict[str]) -> bytes:
        headers["Content-Length"] = str(message_size(message))
        data = message if isinstance(message, bytes) else _body(message)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client_session().post(url, data=data, headers=headers) as reply:
                    raw = await _read_body(reply, url)
                    if reply.status != 200:
                        raise RspamdError(f"{url}: HTTP {reply.status}: {raw[:120]!r}")
                    return raw
        except TimeoutError:
            raise RspamdError(f"{url} gave no answer in {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise RspamdError(f"{url}: {exc}") from exc
        except OSError as exc:
            raise RspamdError(f"{url}: {exc.strerror or exc}") from exc

    async def check(self, subject: Subject, queue_id: str = "") -> RspamdResult:
        """rspamd's answer for ``subject``; RspamdError when none came."""
        headers = envelope_headers(subject, queue_id)
        raw = await self._post(f"{self.url}/checkv2", subject.message, headers)
        return RspamdResult.parse(raw)

    async def learn(self, message: Message, spam: bool) -> None:
        """Teaches the controller ``message`` as spam or ham; RspamdError
        when it could not (an already learned message is not an error)."""
        if not self.controller_url:
            raise RspamdError("no controller_url to learn with")
        url = f"{self.controller_url}/{'learnspam' if spam else 'learnham'}"
        headers: CIMultiDict[str] = CIMultiDict()
        if self.password:
            headers["Password"] = self.password
        try:
            await self._post(url, message, headers)
        except RspamdError as exc:
            # rspamd answers 208 "already learned" for a message it knows.
            if "HTTP 208" not in str(exc):
                raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# One client per running loop and configuration: the check stage is built
# per message, the connections outlive it.
_Clients = dict[tuple[object, ...], "RspamdClient"]
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clients] = (
    weakref.WeakKeyDictionary()
)


async def close_clients() -> None:
    """Closes the running loop's clients (their HTTP connections). Every
    daemon's ``close`` calls it: a client left open is an unclosed aiohttp
    session when the loop ends. A later check makes a new client."""
    clients = _CLIENTS.pop(asyncio.get_running_loop(), {})
    for client in clients.values():
        await client.close()


def client_for(settings: Settings) -> RspamdClient:
    """The running loop's client for ``settings.antispam``."""
    spam = settings.antispam
    key = (spam.rspamd_url, spam.controller_url, spam.password, spam.timeout_seconds)
    clients = _CLIENTS.setdefault(asyncio.get_running_loop(), {})
    client = clients.get(key)
    if client is None:
        client = clients[key] = RspamdClient(
            spam.rspamd_url, spam.timeout_seconds, spam.controller_url, spam.password
        )
    return client


class RspamdCheck:
    """The anti-spam check: rspamd's action as a verdict (:func:`verdict_for`).
    When rspamd gives none, ``on_error`` decides: ``tempfail`` (451 4.7.1)
    or ``accept`` with an ``X-Spam-Checked`` field saying it was not."""

    name = "antispam"

    def __init__(self, client: RspamdClient, on_error: str, hostname: str) -> None:
        self.client = client
        self.on_error = on_error
        self.hostname = hostname

    @classmethod
    def from_settings(cls, settings: Settings) -> RspamdCheck:
        return cls(client_for(settings), settings.antispam.on_error, settings.server.hostname)

    async def check(self, subject: Subject) -> Verdict:
        try:
            result = await self.client.check(subject)
        except RspamdError as exc:
            log.warning("message from <%s> not checked for spam: %s", subject.mail_from, exc)
            if self.on_error == "accept":
                field = f"X-Spam-Checked: no, spam filter unavailable at {self.hostname}\r\n"
                return Verdict(Action.ACCEPT, headers=field.encode(), check=self.name)
            return Verdict(Action.TEMPFAIL, FILTER_UNAVAILABLE, check=self.name)
        verdict = verdict_for(result, self.name)
        if verdict.action is not Action.ACCEPT:
            log.info(
                "%s flow: rspamd %s (%.2f) from <%s>",
                subject.flow.value, result.action, result.score, subject.mail_from,
            )
        return verdict


__all__ = [
    "RspamdCheck",
    "RspamdClient",
    "RspamdError",
    "RspamdResult",
    "client_for",
    "close_clients",
    "envelope_headers",
    "fold",
    "spam_fields",
    "spam_headers",
    "verdict_for",
]
