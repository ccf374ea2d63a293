"""API folder and message ids (``httpapi/ids.py``): named by account and
UIDVALIDITY, so an account move keeps them; ids of earlier versions still
resolve; anything else, or another account's id, is 404."""

from __future__ import annotations

import random

import pytest

from httpapi.errors import ApiError
from httpapi.ids import FolderIds, MessageRef, _encode, folder_id
from storage.model import Mailbox


def _boxes(account_id: int, rows: list[int]) -> list[Mailbox]:
    first = random.randint(1, 2**31 - 100)
    return [
        Mailbox(row, account_id, f"box{row}", first + n, 1, 1, None) for n, row in enumerate(rows)
    ]


def test_ids_are_the_same_whatever_the_mailbox_rows_are() -> None:
    account = random.randint(1, 10**6)
    source = _boxes(account, random.sample(range(1, 10**6), random.randint(1, 9)))
    # The same mailboxes on another shard: other row ids, same UIDVALIDITY.
    rows = random.sample(range(1, 10**6), len(source))
    target = [
        Mailbox(r, b.account_id, b.name, b.uidvalidity, 1, 1, None)
        for b, r in zip(source, rows, strict=True)
    ]
    before, after = FolderIds(account, source), FolderIds(account, target)
    for old, new in zip(source, target, strict=True):
        uid = random.randint(1, 2**32 - 1)
        assert before.folder_id(old.id) == after.folder_id(new.id) == folder_id(new)
        token = before.message_id(old.id, uid)
        assert token == after.message_id(new.id, uid)
        assert after.message(token) == MessageRef(new.id, uid)
        assert after.folder(before.folder_id(old.id)) == new.id


def test_ids_of_earlier_versions_still_resolve() -> None:
    ids = FolderIds(1, _boxes(1, [7]))
    row, uid = random.randint(1, 10**9), random.randint(1, 2**32 - 1)
    assert ids.folder(str(row)) == row
    assert ids.message(_encode(f"m:{row}.{uid}")) == MessageRef(row, uid)


@pytest.mark.parametrize("token", ["", "u", "u1", "u1.", "u-1.5", "x", "u1.2.3", "1e5", "u9.1"])
def test_a_bad_or_foreign_folder_id_is_404(token: str) -> None:
    ids = FolderIds(1, _boxes(1, [4]))
    with pytest.raises(ApiError) as caught:
        ids.folder(token)
    assert caught.value.status == 404


def test_another_accounts_message_id_is_404() -> None:
    mine, theirs = FolderIds(1, _boxes(1, [4])), FolderIds(2, _boxes(2, [5]))
    token = theirs.message_id(5, random.randint(1, 999))
    with pytest.raises(ApiError) as caught:
        mine.message(token)
    assert caught.value.status == 404
    for junk in ("", "!!", _encode("v:1.2"), _encode("m:1"), _encode("v:a.b.c")):
        with pytest.raises(ApiError):
            mine.message(junk)
