"""The shardmail POP3 server (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 AUTH).

``wire`` is the pure wire format, ``maildrop`` the locked INBOX snapshot,
``session`` the state machine and command handlers, ``connection`` the byte
stream, ``server`` the listeners and the entry point :func:`start_pop3`.
"""

from imapd.pop3.server import start_pop3, start_pop3_service, stop_pop3

__all__ = ["start_pop3", "start_pop3_service", "stop_pop3"]
