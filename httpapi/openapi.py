"""The OpenAPI 3.1 description of the API, served at ``/v1/openapi.json``.

Kept by hand next to the routes; ``tests/unit/test_http_openapi.py``
checks that every route of the application appears here and every path
here is routed, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

VERSION = "1.0.0"

_ERROR = {"$ref": "#/components/schemas/Error"}
_ID = {"type": "string", "description": "opaque id"}
_ADDR = {
    "type": "object",
    "properties": {"name": {"type": ["string", "null"]}, "address": {"type": "string"}},
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Invalid request", 401: "Not authenticated", 404: "Not found (or not yours)",
        409: "Already exists", 413: "Too large", 415: "Unsupported media type",
        426: "WebSocket upgrade required", 429: "Rate limited (see Retry-After)",
        503: "Temporarily unavailable",
    }
    return {str(c): _json(_ERROR, text[c]) for c in codes}


def _param(name: str, where: str, schema: dict[str, Any], description: str,
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": schema, "description": description}


_PAGE = [
    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
           "page size"),
    _param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
]
# Folder and message ids stay the same when the account moves to another
# shard (httpapi/ids.py); ids issued by earlier versions are still accepted.
_MESSAGE_ID = _param("message_id", "path", {"type": "string"},
                     "message id; kept when the account moves to another shard")
_FOLDER_ID = _param("folder_id", "path", {"type": "string"},
                    "folder id; kept across renames and moves to another shard")
# Client autoconfiguration (httpapi/autoconfig.py).
_EMAIL = _param("emailaddress", "query", {"type": "string"}, "the account's address")
_AUTHED = {"401": _json(_ERROR, "Not authenticated"), "429": _json(_ERROR, "Rate limited")}


def _op(summary: str, responses: dict[str, Any], *, params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, public: bool = False, tag: str = "mail"
        ) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": dict(responses)}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    if public:
        op["security"] = []
    else:
        op["responses"].update(_AUTHED)
    return op


def _page_of(item: str) -> dict[str, Any]:
    return {"type": "object", "properties": {
        "messages": {"type": "array", "items": _ref(item)},
        "next_cursor": {"type": ["string", "null"]},
    }}


SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "recipient": {"type": "string"}}}}},
    "Folder": {"type": "object", "properties": {
        "id": _ID, "name": {"type": "string"}, "special_use": {"type": ["string", "null"]},
        "total": {"type": "integer"}, "unread": {"type": "integer"}, "size": {"type": "integer"},
    }},
    "MessageSummary": {"type": "object", "properties": {
        "id": _ID, "folder_id": _ID, "from": {"oneOf": [_ADDR, {"type": "null"}]},
        "to": {"type": "array", "items": _ADDR}, "cc": {"type": "array", "items": _ADDR},
        "subject": {"type": "string"}, "preview": {"type": "string"},
        "date": {"type": "string", "format": "date-time"},
        "received_at": {"type": "string", "format": "date-time"},
        "flags": {"type": "array", "items": {"type": "string"}},
        "unread": {"type": "boolean"}, "flagged": {"type": "boolean"},
        "answered": {"type": "boolean"}, "has_attachments": {"type": "boolean"},
        "size": {"type": "integer"}, "thread_id": {"type": ["string", "null"]},
    }},
    "Message": {"allOf": [_ref("MessageSummary"), {"type": "object", "properties": {
        "headers": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
        "text": {"type": ["string", "null"]},
        "html": {"type": ["string", "null"], "description": "sanitized for display"},
        "message_id": {"type": ["string", "null"]},
        "attachments": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "filename": {"type": "string"},
            "content_type": {"type": "string"},
            "size": {"type": "integer", "description": "decoded octets: what the download holds"},
            "url": {"type": "string"}}}},
    }}]},
    "Draft": {"type": "object", "properties": {
        "to": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "cc": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "bcc": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "subject": {"type": "string"}, "text": {"type": "string"}, "html": {"type": "string"},
        "in_reply_to": {"type": "string"},
        "references": {"type": "array", "items": {"type": "string"}},
        "attachments": {"type": "array", "items": {"type": "object", "required": ["content"],
                        "properties": {"filename": {"type": "string"},
                                       "content_type": {"type": "string"},
                                       "content": {"type": "string", "contentEncoding": "base64"}
                                       }}},
    }},
    "SpamSettings": {"type": "object", "properties": {
        "allow": {"type": "array", "maxItems": 1000, "items": {"type": "string"},
                  "description": "user@example.com, example.com or *.example.com (subdomains)"},
        "block": {"type": "array", "maxItems": 1000, "items": {"type": "string"}},
        "junk_threshold": {"type": ["number", "null"],
                           "description": "spam score from which mail goes to Junk"},
    }},
    "Event": {"type": "object", "properties": {
        "id": {"type": "integer"}, "kind": {"enum": ["new", "flags", "expunge", "mailbox"]},
        "folder_id": {"type": ["string", "null"]}, "message_id": {"type": ["string", "null"]},
        "uid": {"type": ["integer", "null"]}, "modseq": {"type": ["integer", "null"]},
        "at": {"type": "string", "format": "date-time"},
        "message": _ref("MessageSummary"),
        "flags": {"type": "array", "items": {"type": "string"}},
    }},
}

PATHS: dict[str, dict[str, Any]] = {
    "/": {"get": _op("Webmail page", {"200": {"description": "HTML page"}}, public=True,
                     tag="webmail")},
    "/static/{path}": {"get": _op(
        "Webmail assets", {"200": {"description": "file"}, "404": {"description": "no file"}},
        params=[_param("path", "path", {"type": "string"}, "asset path")], public=True,
        tag="webmail")},
    "/healthz": {"get": _op("Health: storage reachable", {
        "200": _json({"type": "object"}), "503": _json(_ERROR, "Storage unreachable")},
        public=True, tag="operations")},
    "/v1/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"})},
                                    public=True, tag="operations")},
    "/v1/login": {"post": _op(
        "Exchange address and password for a bearer token",
        {"200": _json({"type": "object", "properties": {
            "token": {"type": "string"}, "token_type": {"const": "Bearer"},
            "expires_at": {"type": "integer"}, "account": {"type": "object"}}}),
         **_errors(400, 401, 429)},
        body={"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["address", "password"],
            "properties": {"address": {"type": "string"}, "password": {"type": "string"}}}}}},
        public=True, tag="session")},
    "/v1/me": {"get": _op("The caller's account and quota use",
                          {"200": _json({"type": "object"})}, tag="session")},
    "/v1/folders": {
        "get": _op("Every folder with counts", {"200": _json({"type": "object", "properties": {
            "folders": {"type": "array", "items": _ref("Folder")}}})}),
        "post": _op("Create a folder", {"201": _json(_ref("Folder")), **_errors(400, 409)},
                    body={"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["name"], "properties": {
                            "name": {"type": "string"}, "parent_id": {"type": "string"}}}}}}),
    },
    "/v1/folders/{folder_id}": {
        "patch": _op("Rename a folder", {"200": _json(_ref("Folder")), **_errors(400, 404, 409)},
                     params=[_FOLDER_ID], body={"required": True, "content": {
                         "application/json": {"schema": {"type": "object", "required": ["name"],
                                              "properties": {"name": {"type": "string"}}}}}}),
        "delete": _op("Delete a folder and its messages",
                      {"204": {"description": "deleted"}, **_errors(400, 404)},
                      params=[_FOLDER_ID]),
    },
    "/v1/folders/{folder_id}/messages": {"get": _op(
        "A folder's messages, newest first by Date (never later than arrival)",
        {"200": _json(_page_of("MessageSummary")), **_errors(400, 404)},
        params=[_FOLDER_ID, *_PAGE,
                _param("unread", "query", {"type": "boolean"}, "only unread / only read"),
                _param("flagged", "query", {"type": "boolean"}, "only flagged / unflagged"),
                _param("from", "query", {"type": "string"}, "From contains"),
                _param("since", "query", {"type": "string", "format": "date"},
                       "received on or after"),
                _param("before", "query", {"type": "string", "format": "date"},
                       "received before")])},
    "/v1/messages": {"post": _op(
        "Send a message (local delivery, remote queue, copy in Sent)",
        {"202": _json({"type": "object", "properties": {
            "message_id": {"type": "string"}, "sent_id": {"type": ["string", "null"]},
            "delivered": {"type": "array"}, "queued": {"type": "array"}}}),
         **_errors(400, 404, 413, 415, 503)},
        body={"required": True, "content": {
            "application/json": {"schema": _ref("Draft")},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "to": {"type": "string"}, "cc": {"type": "string"}, "bcc": {"type": "string"},
                "subject": {"type": "string"}, "text": {"type": "string"},
                "html": {"type": "string"},
                "attachment": {"type": "string", "format": "binary"}}}}}})},
    "/v1/messages/{message_id}": {
        "get": _op("A message: headers, text, sanitized HTML, attachments",
                   {"200": _json(_ref("Message")), **_errors(404)}, params=[_MESSAGE_ID]),
        "patch": _op("Mark unread or read, flag, or move",
                     {"200": _json(_ref("MessageSummary")), **_errors(400, 404)},
                     params=[_MESSAGE_ID], body={"required": True, "content": {
                         "application/json": {"schema": {"type": "object", "properties": {
                             "unread": {"type": "boolean"}, "flagged": {"type": "boolean"},
                             "read": {"type": "boolean", "deprecated": True,
                                      "description": "the negation of unread, for older clients"},
                             "folder_id": {"type": "string"}}}}}}),
        "delete": _op("Move to Trash, or expunge when already in Trash",
                      {"200": _json({"type": "object"}), **_errors(404)}, params=[_MESSAGE_ID]),
    },
    "/v1/messages/{message_id}/raw": {"get": _op(
        "The message source", {"200": {"description": "RFC 5322 message", "content": {
            "message/rfc822": {"schema": {"type": "string", "format": "binary"}}}},
            **_errors(404)}, params=[_MESSAGE_ID])},
    "/v1/messages/{message_id}/attachments/{index}": {"get": _op(
        "One attachment, decoded", {"200": {"description": "the attachment"}, **_errors(404)},
        params=[_MESSAGE_ID, _param("index", "path", {"type": "integer"}, "attachment index"),
                _param("inline", "query", {"type": "string"},
                       "1: inline disposition for images and PDF")])},
    "/v1/search": {"get": _op(
        "Search every folder", {"200": _json(_page_of("MessageSummary")), **_errors(400)},
        params=[_param("q", "query", {"type": "string"},
                       "subject:, from:, to:, cc:, body:, has:attachment, is:unread|read|"
                       "flagged|unflagged, before:/after: YYYY-MM-DD, free text; -term negates"),
                *_PAGE])},
    "/v1/threads/{thread_id}": {"get": _op(
        "A conversation, oldest first", {"200": _json({"type": "object", "properties": {
            "id": {"type": "string"}, "subject": {"type": "string"},
            "messages": {"type": "array", "items": _ref("MessageSummary")}}}), **_errors(404)},
        params=[_param("thread_id", "path", {"type": "string"}, "thread id")])},
    "/v1/settings/spam": {
        "get": _op("The caller's sender allow/block lists and Junk threshold",
                   {"200": _json(_ref("SpamSettings"))}, tag="settings"),
        "put": _op("Replace the caller's lists and threshold (missing: empty, null)",
                   {"200": _json(_ref("SpamSettings")), **_errors(400, 413)},
                   body={"required": True, "content": {"application/json": {
                       "schema": _ref("SpamSettings")}}}, tag="settings"),
    },
    "/v1/events": {"get": _op(
        "WebSocket of change events (RFC 6455); authenticate by header or a first "
        "{\"type\": \"auth\", \"token\"} frame",
        {"101": {"description": "switching to WebSocket; frames carry Event objects"},
         **_errors(400, 426)},
        params=[_param("since", "query", {"type": "integer"}, "resume after this change id")],
        public=True, tag="realtime")},
    "/v1/events/poll": {"get": _op(
        "Long-poll for change events",
        {"200": _json({"type": "object", "properties": {
            "events": {"type": "array", "items": _ref("Event")},
            "last_event_id": {"type": "integer"}}}), **_errors(400)},
        params=[_param("since", "query", {"type": "integer"},
                       "change id; omit to learn the current one"),
                _param("timeout", "query", {"type": "number", "maximum": 60}, "seconds")],
        tag="realtime")},
    **{path: {"get": _op(
        "Thunderbird autoconfig (clientConfig v1.1) from the enabled listeners",
        {"200": {"description": "application/xml"}, "400": {"description": "bad address"}},
        params=[_EMAIL], public=True, tag="autoconfig")}
       for path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml")},
    **{path: {"post": _op(
        "Outlook POX autodiscover",
        {"200": {"description": "application/xml"}, "400": {"description": "bad request"}},
        body={"required": True, "content": {"text/xml": {"schema": {"type": "string"}}}},
        public=True, tag="autoconfig")}
       for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml")},
    "/apple/mobileconfig": {"get": _op(
        "Apple configuration profile (unsigned) for one address",
        {"200": {"description": "application/x-apple-aspen-config"},
         "400": {"description": "bad address"}, "404": {"description": "no listener"}},
        params=[_EMAIL], public=True, tag="autoconfig")},
}


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "shardmail HTTP API",
            "version": VERSION,
            "description": "Mail access for webmail and scripts. Plain HTTP: terminate TLS in "
            "a reverse proxy. Errors are {\"error\": {\"code\", \"message\"}}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"basic": []}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "token from POST /v1/login"},
                "basic": {"type": "http", "scheme": "basic",
                          "description": "account address and password (RFC 7617)"},
            },
        },
    }
