"""Real-client IMAP fixtures: reuse the protocol suite's server factory."""

from tests.protocol.imap.conftest import imap_env, imap_factory  # noqa: F401
