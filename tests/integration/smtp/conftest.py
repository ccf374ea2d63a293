"""The SMTP integration suites share the protocol suite's fixtures: a dnsmasq
with the test zone, settings pointing at it, populated storage, a running mtad."""

from tests.protocol.smtp.conftest import (  # noqa: F401
    dkim_key,
    dns,
    mta,
    populated,
    populated_template,
    settings,
    smtp_overrides,
)
