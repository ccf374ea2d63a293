"""shardmail storage: the data plane every daemon shares.

``open_storage(settings)`` opens it; the seam is in :mod:`storage.api`, the
values in :mod:`storage.model`, the errors in :mod:`storage.errors`.
"""

from storage.api import BlobStore, Directory, EventBus, MailStore, Route, Storage, Subscription
from storage.backend import SqlStorage, open_storage, open_storage_from_url
from storage.errors import ErrorKind, StorageError
from storage.sql.directory import password_hasher

__all__ = [
    "BlobStore",
    "Directory",
    "ErrorKind",
    "EventBus",
    "MailStore",
    "Route",
    "SqlStorage",
    "Storage",
    "StorageError",
    "Subscription",
    "open_storage",
    "open_storage_from_url",
    "password_hasher",
]
