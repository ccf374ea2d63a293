"""The sender list grammar and the filing rules of delivery/acctpolicy.py,
as tables: what an entry normalises to or why it is refused, which entry
decides a sender, and where a message goes for one account."""

from __future__ import annotations

import pytest

from delivery.acctpolicy import (
    ALLOW,
    BLOCK,
    EntryError,
    Filing,
    Listing,
    filing,
    listing,
    parse_entry,
    senders,
)
from delivery.checks import Action, Verdict, combine
from storage.model import SpamPolicy


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("User@Example.COM", "user@example.com"),
        ("  example.com ", "example.com"),
        ("Example.com.", "example.com"),
        ("*.Example.com", "*.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),  # IDNA A-label (RFC 5890)
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("jörg@bücher.example", "jörg@xn--bcher-kva.example"),
        ('"odd one"@example.com', '"odd one"@example.com'),
        ("localhost", "localhost"),
    ],
)
def test_entries_normalise(text: str, entry: str) -> None:
    assert parse_entry(text) == entry


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "address or a domain"),
        (".example.com", "write *.example.com"),
        ("@example.com", "write example.com"),
        ("*@example.com", "write example.com"),
        ("a.*.example", "not an address"),
        ("*", "not an address"),
        ("exa mple.com", "not an address"),
        ("user@[127.0.0.1]", "address literal"),
        ("[127.0.0.1]", "names and dots"),
        ("a@b@c", "not an address"),
        ("-bad-.example", "not an address"),
        ("x" * 64 + ".example", "not an address"),  # RFC 1035 2.3.4: 63 per label
        ("\ud800.example", "not an address"),
    ],
)
def test_junk_entries_are_refused(text: str, why: str) -> None:
    with pytest.raises(EntryError) as err:
        parse_entry(text)
    assert why in str(err.value)


POLICY = SpamPolicy(
    allow=("boss@corp.example", "*.partner.example", "friend@spam.example"),
    block=("corp.example", "spam.example", "*.example", "mx.partner.example"),
)


@pytest.mark.parametrize(
    ("mail_from", "header_from", "expected"),
    [
        ("boss@corp.example", [], Listing(ALLOW, "boss@corp.example")),  # address first
        ("Boss@CORP.example", [], Listing(ALLOW, "boss@corp.example")),
        ("intern@corp.example", [], Listing(BLOCK, "corp.example")),
        ("a@deep.mx.partner.example", [], Listing(ALLOW, "*.partner.example")),
        ("a@mx.partner.example", [], Listing(BLOCK, "mx.partner.example")),  # exact domain
        ("a@partner.example", [], Listing(BLOCK, "*.example")),  # *. is not the domain itself
        ("a@other.test", [], Listing()),
        ("", ["friend@spam.example"], Listing(ALLOW, "friend@spam.example")),  # a bounce
        # Any blocked sender wins over an allowed one.
        ("boss@corp.example", ["x@spam.example"], Listing(BLOCK, "spam.example")),
        (
            "a@other.test",
            ["not an address", "boss@corp.example"],
            Listing(ALLOW, "boss@corp.example"),
        ),
    ],
)
def test_the_most_specific_entry_decides(
    mail_from: str, header_from: list[str], expected: Listing
) -> None:
    assert listing(POLICY, senders(mail_from, header_from)) == expected


def test_only_the_first_header_from_addresses_count() -> None:
    many = [f"a{i}@other.test" for i in range(50)] + ["x@spam.example"]
    assert listing(POLICY, senders("", many)) == Listing()


SPAM = Verdict(Action.QUARANTINE, score=8.0, check="antispam")
HAM = Verdict(Action.ACCEPT, score=1.5, check="antispam")
UNSCORED_JUNK = Verdict(Action.QUARANTINE, check="other")


@pytest.mark.parametrize(
    ("verdict", "policy", "found", "dmarc", "mailbox", "reason"),
    [
        (combine([HAM]), SpamPolicy(), Listing(), False, "INBOX", None),
        (combine([SPAM]), SpamPolicy(), Listing(), False, "Junk", None),
        (combine([HAM]), SpamPolicy(), Listing(), True, "Junk", None),
        (combine([HAM]), SpamPolicy(), Listing(BLOCK, "x.example"), False, "Junk", "USER_BLOCK"),
        (combine([SPAM]), SpamPolicy(), Listing(ALLOW, "x.example"), False, "INBOX", "USER_ALLOW"),
        # An allow list does not undo DMARC's quarantine nor a non-spam Junk.
        (combine([SPAM]), SpamPolicy(), Listing(ALLOW, "x.example"), True, "Junk", "DMARC"),
        (
            combine([UNSCORED_JUNK, HAM]),
            SpamPolicy(),
            Listing(ALLOW, "x"),
            False,
            "Junk",
            "CONTENT",
        ),
        # Thresholds: at or above is Junk, below is INBOX, whatever rspamd did.
        (
            combine([SPAM]),
            SpamPolicy(junk_threshold=8.5),
            Listing(),
            False,
            "INBOX",
            "USER_THRESHOLD",
        ),
        (
            combine([SPAM]),
            SpamPolicy(junk_threshold=8.0),
            Listing(),
            False,
            "Junk",
            "USER_THRESHOLD",
        ),
        (
            combine([HAM]),
            SpamPolicy(junk_threshold=1.0),
            Listing(),
            False,
            "Junk",
            "USER_THRESHOLD",
        ),
        (combine([HAM]), SpamPolicy(junk_threshold=1.0), Listing(), True, "Junk", None),
        # No score (rspamd off or unreachable): the threshold does nothing.
        (combine([Verdict()]), SpamPolicy(junk_threshold=-5.0), Listing(), False, "INBOX", None),
    ],
)
def test_filing(
    verdict: Verdict,
    policy: SpamPolicy,
    found: Listing,
    dmarc: bool,
    mailbox: str,
    reason: str | None,
) -> None:
    got = filing(verdict, policy, found, dmarc)
    assert got.mailbox == mailbox
    if reason is None:
        assert got == Filing(mailbox)
    else:
        text = got.field.decode("ascii")
        assert text.startswith(f"X-Spam-Policy: {mailbox}, reason={reason} ")
        assert text.endswith("\r\n") and text.count("\r\n") == 1 and len(text) < 998
