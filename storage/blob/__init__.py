"""Blob store backends: raw RFC 5322 bytes, content-addressed by SHA-256.

``fs`` is the default (a directory tree on local disk). An S3-compatible
backend belongs beside it as ``storage/blob/s3.py`` implementing the same
:class:`storage.api.BlobStore` protocol; :func:`open_blob_store` picks by URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.blob.fs import FsBlobStore


def open_blob_store(
    location: str | Path,
    *,
    pack_max_bytes: int = 0,
    pack_path: str | None = None,
    pack_db: Any = None,
) -> FsBlobStore:
    """A blob store for ``location``: a directory path (or ``file://`` URL),
    blobs of at most ``pack_max_bytes`` packed in one file there (0: none),
    or in the SQLite database file ``pack_path`` (its ``blobs`` table), or,
    for deliveries into the PostgreSQL ``Database`` ``pack_db``, in its
    ``blobs`` table.

    ``s3://bucket/prefix`` is where the S3 backend plugs in.
    """
    loc = str(location)
    if loc.startswith("s3://"):
        raise NotImplementedError("the S3 blob backend is not built yet")
    if loc.startswith("file://"):
        loc = loc[len("file://") :]
    return FsBlobStore(
        Path(loc), pack_max_bytes=pack_max_bytes, pack_path=pack_path, pack_db=pack_db
    )


__all__ = ["FsBlobStore", "open_blob_store"]
