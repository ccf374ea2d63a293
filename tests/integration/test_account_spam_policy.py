# ruff: noqa: F401, F811  (fixtures imported from the rspamd and SMTP suites)
"""Each account's sender lists and Junk threshold (issue #22,
delivery/acctpolicy.py) on the MX, with a real rspamd scoring
(tests/rspamdserver.py), mail sent with smtplib and read back with imaplib.

One message to alice and bob: bob's block list files his copy in Junk
while alice's lands in INBOX; alice's allow list keeps spam rspamd would
file in Junk in her INBOX (bob's copy still goes to Junk) but never lets
rspamd's refusal through; a threshold above the spam score keeps spam in
INBOX, one below a clean message's score sends it to Junk. Each decided
copy says why in ``X-Spam-Policy``; a copy no policy touched has none.
"""

from __future__ import annotations

import asyncio
import random
import smtplib

import pytest

from mtad.service import Service
from storage.model import SpamPolicy
from tests.integration.test_antivirus import random_clean
from tests.integration.test_rspamd import (
    SPOOL_AT,
    field,
    header_of,
    imap_fetch,
    imap_port,
    message,
    settings,
    spam_overrides,
    words,
)
from tests.protocol.smtp.conftest import (
    dkim_key,
    dns,
    mta,
    populated,
    populated_template,
)
from tests.protocol.smtp.support import ALICE, ALICE_PW, BOB, BOB_PW
from tests.rspamdserver import GTUBE, SPAM_TOKEN, SPAM_TOKEN_SCORE, rspamd

SENDER = "someone@unlisted.example"  # the From of tests.integration.test_rspamd.message


def smtp_send(port: int, mail_from: str, rcpts: list[str], body: bytes) -> None:
    """One transaction to the MX with smtplib (bytes kept as they are)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=60) as client:
        client.sendmail(mail_from, rcpts, body)


async def send(mta: Service, body: bytes, mail_from: str = SENDER) -> None:
    await asyncio.to_thread(smtp_send, mta.port("mx"), mail_from, [ALICE, BOB], body)


async def boxes(port: int, user: str, password: str) -> dict[str, list[bytes]]:
    return {
        box: await asyncio.to_thread(imap_fetch, port, user, password, box)
        for box in ("INBOX", "Junk")
    }


async def set_policy(storage, address: str, policy: SpamPolicy) -> None:
    account = await storage.directory.get_account(address)
    await storage.mail(account).put_spam_policy(account.id, policy)


@pytest.mark.parametrize(
    ("entry", "mail_from"),
    [
        ("unlisted.example", SENDER),  # the domain, seen in both senders
        ("*.example", SENDER),  # a wildcard over its parent
        ("SomeOne@UNLISTED.example", SENDER),  # the address, in any case
        ("someone@unlisted.example", "bounces@lists.example"),  # the header From alone
        ("lists.example", "bounces@lists.example"),  # the envelope sender alone
    ],
)
async def test_a_blocked_sender_goes_to_that_recipients_junk_only(
    mta: Service,
    populated,
    imap_port: int,
    entry: str,
    mail_from: str,
) -> None:
    from delivery.acctpolicy import parse_entry

    await set_policy(populated, BOB, SpamPolicy(block=(parse_entry(entry),)))
    rng = random.Random()
    body = message(rng, words(rng, rng.randrange(20, 200)))
    await send(mta, body, mail_from)
    alice = await boxes(imap_port, ALICE, ALICE_PW)
    bob = await boxes(imap_port, BOB, BOB_PW)
    assert len(alice["INBOX"]) == 1 and alice["Junk"] == []
    assert bob["INBOX"] == [] and len(bob["Junk"]) == 1
    assert alice["INBOX"][0].endswith(body) and bob["Junk"][0].endswith(body)
    assert field(bob["Junk"][0], "X-Spam-Policy") == (
        f"Junk, reason=USER_BLOCK entry={parse_entry(entry)}"
    )
    assert field(bob["Junk"][0], "X-Spam-Status").startswith("No, ")  # rspamd saw no spam
    assert "X-Spam-Policy" not in header_of(alice["INBOX"][0])


async def test_an_allowed_sender_keeps_spam_out_of_junk(
    mta: Service,
    populated,
    imap_port: int,
) -> None:
    await set_policy(populated, ALICE, SpamPolicy(allow=("unlisted.example",)))
    rng = random.Random()
    body = message(rng, f"Buy now {SPAM_TOKEN} {words(rng, 30)}")
    await send(mta, body)
    alice = await boxes(imap_port, ALICE, ALICE_PW)
    bob = await boxes(imap_port, BOB, BOB_PW)
    assert len(alice["INBOX"]) == 1 and alice["Junk"] == []
    assert bob["INBOX"] == [] and len(bob["Junk"]) == 1  # no list of his: rspamd decides
    kept = alice["INBOX"][0]
    assert kept.endswith(body)
    assert field(kept, "X-Spam-Policy") == "INBOX, reason=USER_ALLOW entry=unlisted.example"
    assert field(kept, "X-Spam-Status").startswith("Yes, ")  # rspamd's own word is kept


async def test_an_allow_list_never_lets_a_refusal_through(
    mta: Service,
    populated,
    imap_port: int,
) -> None:
    for address in (ALICE, BOB):
        await set_policy(populated, address, SpamPolicy(allow=(SENDER,)))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await send(mta, message(random.Random(), GTUBE))
    assert refused.value.smtp_code == 550
    for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
        assert await boxes(imap_port, user, password) == {"INBOX": [], "Junk": []}


async def test_a_threshold_moves_mail_between_inbox_and_junk(
    mta: Service,
    populated,
    imap_port: int,
) -> None:
    rng = random.Random()
    # Above the spam's score: rspamd's "add header" stays in alice's INBOX.
    await set_policy(populated, ALICE, SpamPolicy(junk_threshold=SPAM_TOKEN_SCORE + 3))
    spam = message(rng, f"{SPAM_TOKEN} {words(rng, 30)}")
    await send(mta, spam)
    alice = await boxes(imap_port, ALICE, ALICE_PW)
    assert len(alice["INBOX"]) == 1 and alice["Junk"] == []
    assert len((await boxes(imap_port, BOB, BOB_PW))["Junk"]) == 1
    score = float(field(alice["INBOX"][0], "X-Spam-Score"))
    assert field(alice["INBOX"][0], "X-Spam-Policy") == (
        f"INBOX, reason=USER_THRESHOLD score={score:.2f} threshold={SPAM_TOKEN_SCORE + 3:.2f}"
    )
    # Below a clean message's score: rspamd's "no action" goes to alice's Junk.
    await set_policy(populated, ALICE, SpamPolicy(junk_threshold=-20.0))
    clean = message(rng, words(rng, 80))
    await send(mta, clean)
    alice = await boxes(imap_port, ALICE, ALICE_PW)
    bob = await boxes(imap_port, BOB, BOB_PW)
    assert len(alice["Junk"]) == 1 and alice["Junk"][0].endswith(clean)
    assert field(alice["Junk"][0], "X-Spam-Policy").startswith("Junk, reason=USER_THRESHOLD ")
    assert field(alice["Junk"][0], "X-Spam-Status").startswith("No, ")
    assert [raw for raw in bob["INBOX"] if raw.endswith(clean)]  # bob has no threshold


async def test_a_spooled_message_is_filed_by_its_header_from(
    mta: Service, populated, imap_port: int
) -> None:
    """A message past the spool threshold keeps its body in a file: the
    header From is read from the spooled header, and the copy stays
    byte-exact (8-bit lines, dot-stuffing) in Junk."""
    await set_policy(populated, BOB, SpamPolicy(block=(SENDER,)))
    rng = random.Random()
    body = random_clean(rng.randrange(SPOOL_AT + 1, 3 * SPOOL_AT), rng)
    await send(mta, body, "bounces@lists.example")
    alice = await boxes(imap_port, ALICE, ALICE_PW)
    bob = await boxes(imap_port, BOB, BOB_PW)
    assert len(alice["INBOX"]) == 1 and alice["INBOX"][0].endswith(body)
    assert bob["INBOX"] == [] and len(bob["Junk"]) == 1 and bob["Junk"][0].endswith(body)
    assert field(bob["Junk"][0], "X-Spam-Policy") == f"Junk, reason=USER_BLOCK entry={SENDER}"
