"""The IMAP4rev1 server (RFC 3501) with its extensions.

``wire`` is the pure protocol layer (bytes in, frozen dataclasses out, and
the response encoder); ``session`` holds per-connection state; ``commands``
has one ``handle_<cmd>`` per command; ``server.start_imap`` starts the
listeners.
"""
