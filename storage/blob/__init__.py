"""Blob store backends: raw RFC 5322 bytes, content-addressed by SHA-256.

``fs`` is the default (a directory tree on local disk); ``s3``
(``storage/blob/s3.py``) keeps them in an S3-compatible bucket. Both
implement the :class:`storage.api.BlobStore` protocol;
:func:`open_blob_store` picks by URL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.blob.fs import FsBlobStore
from storage.blob.s3 import S3BlobStore, S3Config


def open_blob_store(
    location: str | Path,
    *,
    pack_max_bytes: int = 0,
    pack_path: str | None = None,
    pack_db: Any = None,
) -> FsBlobStore | S3BlobStore:
    """A blob store for ``location``: a directory path (or ``file://`` URL),
    blobs of at most ``pack_max_bytes`` packed in one file there (0: none),
    or in the SQLite database file ``pack_path`` (its ``blobs`` table), or,
    for deliveries into the PostgreSQL ``Database`` ``pack_db``, in its
    ``blobs`` table.

    ``s3://bucket/prefix?endpoint=...`` is an S3-compatible bucket
    (:meth:`S3Config.from_url`: endpoint, region and credentials from the
    URL or the ``AWS_*`` environment). Nothing is packed there: every blob
    is an object, and the pack arguments are ignored.
    """
    loc = str(location)
    if loc.startswith("s3://"):
        return S3BlobStore(S3Config.from_url(loc))
    if loc.startswith("file://"):
        loc = loc[len("file://") :]
    return FsBlobStore(
        Path(loc), pack_max_bytes=pack_max_bytes, pack_path=pack_path, pack_db=pack_db
    )


__all__ = ["FsBlobStore", "S3BlobStore", "open_blob_store"]
