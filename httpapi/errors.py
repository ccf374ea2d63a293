"""API errors: one JSON shape for every failure a client can see.

Every error response is ``{"error": {"code": "...", "message": "..."}}`` with
an HTTP status; storage failures map through
:data:`storage.errors.HTTP_STATUS` (classified once), and every 503 carries
``Retry-After``. A client never sees a
traceback: anything unexpected is a 500 ``internal`` with a generic message.
"""

from __future__ import annotations

from aiohttp import web

from storage.errors import HTTP_STATUS, ErrorKind, StorageError

RETRY_AFTER_SECONDS = 5  # a failover or a restart of the database takes seconds


class ApiError(Exception):
    """A failure to report to the client as ``status`` with a stable ``code``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


def not_found(what: str = "message") -> ApiError:
    # The same answer for "does not exist" and "is not yours": no probing of ids.
    return ApiError(404, "not_found", f"no such {what}")


def from_storage(err: StorageError) -> ApiError:
    code = err.kind.name.lower()
    status = HTTP_STATUS.get(err.kind, 500)
    if err.kind is ErrorKind.TEMPORARY:
        # Never the backend's words (they may name hosts or paths).
        return ApiError(status, code, "try again later", retry_later())
    return ApiError(status, code, err.message)


def retry_later() -> dict[str, str]:
    """Headers of a 503: RFC 9110 section 10.2.3 Retry-After, so clients back
    off instead of hammering a recovering database."""
    return {"Retry-After": str(RETRY_AFTER_SECONDS)}


def error_response(err: ApiError) -> web.Response:
    return web.json_response(
        {"error": {"code": err.code, "message": err.message}},
        status=err.status,
        headers=err.headers,
    )
