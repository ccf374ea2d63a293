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
