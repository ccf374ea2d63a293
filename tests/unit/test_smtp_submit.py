"""delivery.submit.submit_message: the one send path (SMTP submission, HTTP API)."""

from __future__ import annotations

import pytest

from delivery.submit import SubmitError, submit_message
from storage.errors import ErrorKind
from tests.protocol.smtp.support import (
    ALICE,
    BOB,
    FORWARD,
    REMOTE,
    mailbox_entries,
    mailbox_messages,
    message,
    populate,
)


@pytest.fixture
async def store(storage):
    await populate(storage)
    return storage


async def test_local_remote_and_sent_copy(store, settings) -> None:
    raw = message(sender=ALICE, to=BOB)
    result = await submit_message(store, settings, await _alice(store), ALICE,
                                  [BOB, "<bob+tag@example.net>", REMOTE, FORWARD], raw)
    assert list(result.delivered) == [BOB]  # bob once, despite the plus-address
    assert result.queued == (REMOTE,)  # the forward target is the same address
    assert result.sent is not None
    [inbox] = await mailbox_messages(store, BOB)
    assert inbox == b"Return-Path: <alice@example.net>\r\n" + raw
    [sent] = await mailbox_entries(store, ALICE, "Sent")
    assert "\\Seen" in sent.flags
    assert await store.blobs.get(sent.blob_key) == raw
    [queued] = await store.queue.list()
    assert queued.sender == ALICE and queued.blob_key == result.blob_key
    assert await store.blobs.get(queued.blob_key) == raw


@pytest.mark.parametrize(
    ("mail_from", "rcpts", "kind", "http"),
    [
        (BOB, [BOB], ErrorKind.NO_PERMISSION, 403),
        (ALICE, ["ghost@example.net"], ErrorKind.NOT_FOUND, 404),
        (ALICE, [], ErrorKind.INVALID, 400),
        (ALICE, ["not an address"], ErrorKind.INVALID, 400),
    ],
)
async def test_refusals_are_classified(store, settings, mail_from, rcpts, kind, http) -> None:
    with pytest.raises(SubmitError) as info:
        await submit_message(store, settings, await _alice(store), mail_from, rcpts, message())
    assert info.value.kind is kind
    assert info.value.http_status == http
    assert await mailbox_messages(store, BOB) == []
    assert await store.queue.list() == []


async def test_unknown_recipient_named(store, settings) -> None:
    with pytest.raises(SubmitError) as info:
        await submit_message(store, settings, await _alice(store), ALICE,
                             [BOB, "ghost@example.net"], message())
    assert info.value.recipient == "ghost@example.net"
    assert info.value.smtp_reply == (550, "5.1.1")
    assert await mailbox_messages(store, BOB) == []  # nothing half-delivered


async def test_over_quota(store, settings) -> None:
    await store.directory.set_quota(BOB, 100)
    with pytest.raises(SubmitError) as info:
        await submit_message(store, settings, await _alice(store), ALICE, [BOB], message())
    assert info.value.kind is ErrorKind.OVER_QUOTA
    assert info.value.smtp_reply == (452, "4.2.2")


async def test_alias_may_be_used_as_sender(store, settings) -> None:
    await store.directory.add_alias("postmaster@example.net", ALICE)
    result = await submit_message(store, settings, await _alice(store),
                                  "postmaster@example.net", [BOB], message())
    assert list(result.delivered) == [BOB]


async def _alice(store):
    return await store.directory.get_account(ALICE)
