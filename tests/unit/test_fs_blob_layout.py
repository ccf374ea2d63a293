"""The filesystem blob store's layout and its directory fsyncs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from storage.blob import fs
from storage.blob.fs import FsBlobStore


def test_one_directory_level_fsynced_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``root/ab/<key>``: the first blob of a prefix makes its directory and
    fsyncs the root; later blobs there fsync only their own directory."""
    synced: list[str] = []
    real = fs._fsync_dir
    monkeypatch.setattr(fs, "_fsync_dir", lambda p: (synced.append(str(p)), real(p)))
    store = FsBlobStore(tmp_path / "blobs")
    root = str(tmp_path / "blobs")
    # Two payloads whose keys share their first two hex digits.
    first = b"0"
    prefix = hashlib.sha256(first).hexdigest()[:2]
    second = next(
        data
        for n in range(1, 100_000)
        if hashlib.sha256(data := str(n).encode() + b"x").hexdigest()[:2] == prefix
    )
    key = store.put_sync(first)
    assert store.path(key) == tmp_path / "blobs" / key[:2] / key
    assert store.path(key).read_bytes() == first
    assert synced == [root, os.path.join(root, prefix)]
    synced.clear()
    store.put_sync(second)
    assert synced == [os.path.join(root, prefix)]  # no new directory, no root fsync
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [prefix]


async def test_blobs_of_the_two_level_layout_move_up_when_storage_opens(tmp_path: Path) -> None:
    """A data directory written by the earlier ``ab/cd/<key>`` layout keeps
    every message readable after the upgrade."""
    from storage.backend import open_storage_from_url
    from tests.contract.conftest import TEST_HASHER

    blobs = tmp_path / "blobs"
    payloads = [b"old message %d\r\n" % n for n in range(20)]
    for data in payloads:
        key = hashlib.sha256(data).hexdigest()
        legacy = blobs / key[:2] / key[2:4]
        legacy.mkdir(parents=True, exist_ok=True)
        (legacy / key).write_bytes(data)
    (legacy / ".tmp-1234-abcd-0").write_bytes(b"half a write")
    storage = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}", blobs, password_hasher=TEST_HASHER
    )
    try:
        for data in payloads:
            assert await storage.blobs.get(hashlib.sha256(data).hexdigest()) == data
        assert sorted(await storage.blobs.keys()) == sorted(
            hashlib.sha256(d).hexdigest() for d in payloads
        )
        # Nothing is left of the old layout: no second-level directories.
        assert not [p for p in blobs.glob("*/*") if p.is_dir()]
        assert (blobs / ".layout-one-level").exists()  # later starts skip the scan
        assert storage.blobs.migrate_layout() == 0
    finally:
        await storage.close()
