"""SMTP replies: RFC 5321 section 4.2 codes with RFC 3463 enhanced status codes.

Every reply the server sends carries an enhanced code (RFC 2034 section 3),
except where RFC 2034 and RFC 3463 leave none: the 220 greeting, the
HELO/EHLO replies, 334 AUTH challenges and the 354 DATA go-ahead (RFC 3463
has no class for 3xx). Replies are named constants so tests and code agree.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Reply(NamedTuple):
    """One reply line: ``code enhanced text``."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def with_text(self, text: str) -> Reply:
        return self._replace(text=text)

    @property
    def is_error(self) -> bool:
        return self.code >= 400


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")  # RFC 3463 X.1.0 other address status
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")  # X.1.5 destination address valid
QUEUED = Reply(250, "2.0.0", "OK: message accepted")
BYE = Reply(221, "2.0.0", "Bye")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")  # RFC 3207 section 4
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")  # RFC 4954 section 6
VRFY_CANNOT = Reply(252, "2.1.5", "Cannot VRFY user, but will accept message")

# 4xx: transient.
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")  # RFC 5321 4.5.3.2
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_UNKNOWN_RECIPIENTS = Reply(421, "4.7.0", "Too many unknown recipients, closing connection")
RATE_LIMITED_SESSION = Reply(421, "4.7.0", "Rate limit exceeded, closing connection")
RATE_LIMITED = Reply(450, "4.7.1", "Rate limit exceeded, try again later")
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary local problem, try again later")
DNS_TEMP_FAILURE = Reply(451, "4.4.3", "Temporary DNS failure, try again later")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")  # RFC 3463 X.2.2 (see README choice)
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")  # RFC 5321 4.5.3.1.10
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")  # RFC 3207 section 4

# 5xx: permanent.
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")  # RFC 5321 4.5.3.1.4 / 4.5.3.1.10
DATA_LINE_TOO_LONG = Reply(
    500, "5.5.2", "Message line too long (RFC 5321 section 4.5.3.1.6)"
)  # 4.5.3.1.10 prescribes "500 Line too long"; the session names its limit
# RFC 5321 section 2.3.8: a command line ends with CRLF; the line is not executed.
COMMAND_BARE_LF = Reply(500, "5.5.2", "Bare LF in command line, end commands with CRLF")
COMMAND_BARE_CR = Reply(500, "5.5.2", "Bare CR in command line, end commands with CRLF")
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
BAD_ARGUMENTS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")  # RFC 4954 section 6
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
# RFC 8689 section 2 (REQUIRETLS only on a TLS session), RFC 5248 X.7.10 encryption needed.
REQUIRETLS_NEEDS_TLS = Reply(530, "5.7.10", "REQUIRETLS needs a TLS session: STARTTLS first")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
# RFC 4954 section 6: the server cannot check credentials now (storage down, busy).
AUTH_TEMP_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
DMARC_REJECT = Reply(550, "5.7.1", "Rejected by DMARC policy")  # RFC 7489 sections 6.7, 10.3
BARE_LF = Reply(550, "5.6.0", "Bare LF or CR in message (RFC 5321 section 2.3.8)")
SMUGGLING = Reply(
    550, "5.6.0", 'Message refused: a "." line not ended by CRLF (RFC 5321 section 4.1.1.4)'
)
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# RFC 3030 section 3 / RFC 3463 X.6.3: no BINARYMIME to where it cannot go on.
BINARYMIME_NOT_RELAYED = Reply(
    550, "5.6.3", "BODY=BINARYMIME accepted for local mailboxes only; send it as MIME"
)
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header too large")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
FROM_NOT_OWNED = Reply(550, "5.7.1", "From: header not owned by authenticated user")
BAD_ADDRESS = Reply(553, "5.1.3", "Malformed address")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531
PARAM_UNKNOWN = Reply(555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized")
TRANSACTION_FAILED = Reply(554, "5.0.0", "Transaction failed")

# Enhanced codes for reply lines produced by aiosmtpd itself, by basic code.
_DEFAULT_ENHANCED: dict[int, str] = {
    211: "2.0.0",
    214: "2.0.0",
    220: "2.0.0",
    221: "2.0.0",
    235: "2.7.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.0.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    534: "5.7.9",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    551: "5.1.6",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}

_REPLY_LINE = re.compile(r"^(\d{3})([ -])(.*)$", re.S)
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?: |$)")


def with_enhanced_code(line: str) -> str:
    """Insert a default RFC 3463 code into ``line`` if it carries none.

    ``line`` is one reply line without CRLF. 3xx replies and lines that are
    not replies are returned unchanged.
    """
    match = _REPLY_LINE.match(line)
    if not match:
        return line
    code, sep, text = int(match[1]), match[2], match[3]
    if code < 200 or 300 <= code < 400 or _ENHANCED.match(text):
        return line
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code // 100}.0.0")
    # aiosmtpd's "Error: " prefix adds nothing next to a code.
    text = text.removeprefix("Error: ")
    return f"{code}{sep}{enhanced} {text}".rstrip()


def reply_code(line: str) -> int | None:
    match = _REPLY_LINE.match(line)
    return int(match[1]) if match else None
