"""Request bodies: read under a per-route size limit, JSON parsed with a depth limit.

Contract: :func:`read_body` returns at most ``limit`` octets or raises a 413
``ApiError`` as soon as the declared ``Content-Length`` or the octets
actually received pass the limit, so a hostile client can make the server
hold no more than ``limit`` (plus one read chunk) per request, whether the
body is sized or chunked. :func:`json_body` adds 400s for a body that is not
a JSON object, nests deeper than :data:`MAX_JSON_DEPTH` or holds a string
that is not Unicode text.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from httpapi.errors import ApiError, bad_request

# Per-route limits (octets). A login is an address and a password (each at
# most session.MAX_CREDENTIAL characters, up to 6 octets each when escaped).
LOGIN_BODY_LIMIT = 16 * 1024
# Folder create/rename and message PATCH carry a few short fields.
JSON_BODY_LIMIT = 64 * 1024
# No route's JSON nests deeper than a send with attachments ({"attachments": [{...}]}).
MAX_JSON_DEPTH = 8
READ_CHUNK = 64 * 1024


def too_large(limit: int, what: str = "request body") -> ApiError:
    # RFC 9110 section 15.5.14: 413 Content Too Large.
    return ApiError(413, "request_too_large", f"{what} larger than {limit} octets")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 past ``limit`` octets (checked on the
    declared length first, then on what arrives)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    data = bytearray()
    while chunk := await request.content.read(READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise too_large(limit)
    return bytes(data)


def _check_values(value: Any) -> None:
    """400 for nesting past :data:`MAX_JSON_DEPTH` or a string that is not
    Unicode text (a lone surrogate from a "\\ud800" escape, which RFC 8259
    section 8.2 leaves undefined and no UTF-8 column or header can hold).
    Iterative, each value visited once."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if isinstance(item, dict):
            for key in item:
                _check_text(key)
            item = list(item.values())
        if isinstance(item, list):
            if level > MAX_JSON_DEPTH:
                raise bad_request(
                    f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "invalid_json"
                )
            stack.extend((child, level + 1) for child in item)


def is_text(text: str) -> bool:
    """Encodable as UTF-8: a lone surrogate is not text, and no column,
    header or JSON reply can hold it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text: str) -> None:
    if not is_text(text):
        raise bad_request("JSON strings must be Unicode text", "invalid_json")


def parse_json(data: bytes) -> Any:
    """JSON (RFC 8259) with nesting capped at :data:`MAX_JSON_DEPTH`; 400 otherwise.

    The C decoder is linear and stops a hostile nesting with RecursionError
    (the interpreter's limit) long before the stack is at risk; the checks
    afterwards walk each value once.
    """
    try:
        value = json.loads(data)
    except RecursionError:
        raise bad_request("JSON nested too deeply", "invalid_json") from None
    except ValueError:  # also UnicodeDecodeError: RFC 8259 section 8.1 wants UTF-8
        raise bad_request("request body must be JSON", "invalid_json") from None
    _check_values(value)
    return value


async def json_body(request: web.Request, limit: int = JSON_BODY_LIMIT) -> dict[str, Any]:
    """A JSON object body of at most ``limit`` octets."""
    body = parse_json(await read_body(request, limit))
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", "invalid_json")
    return body
