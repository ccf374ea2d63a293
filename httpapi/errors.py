"""API errors: one JSON shape for every failure a client can see.

Every error response is ``{"error": {"code": "...", "message": "..."}}`` with
an HTTP status; storage failures map through
:data:`storage.errors.HTTP_STATUS` (classified once). A client never sees a
traceback: anything unexpected is a 500 ``internal`` with a generic message.
"""

from __future__ import annotations

from aiohttp import web

from storage.errors import HTTP_STATUS, ErrorKind, StorageError


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
    message = err.message if err.kind is not ErrorKind.TEMPORARY else "try again later"
    return ApiError(status, code, message)


def error_response(err: ApiError) -> web.Response:
    return web.json_response(
        {"error": {"code": err.code, "message": err.message}},
        status=err.status,
        headers=err.headers,
    )
