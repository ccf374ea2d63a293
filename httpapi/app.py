"""The aiohttp application: routes, middlewares, webmail page, health.
(``/metrics`` is not on this public port: runtime.scrape serves it on
``server.metrics_listen``.)

Request path through the middlewares, outermost first:

1. ``errors``: every failure becomes ``{"error": {"code", "message"}}``
   (storage errors mapped once through ``storage.errors.HTTP_STATUS``); an
   unexpected exception is logged and answered 500 without details. It also
   records request metrics.
2. ``access``: per-IP rate limit on ``/v1``, then authentication (bearer
   token or Basic) for every ``/v1`` route except the public ones, then the
   per-user rate limit. 429 answers carry ``Retry-After`` (RFC 6585 section 4).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from conf.settings import Settings
from httpapi import autoconfig, folders, messages, realtime, search, session, spam
from httpapi.auth import Authenticator, TokenSigner
from httpapi.body import JSON_BODY_LIMIT
from httpapi.context import ACCOUNT_KEY, CONTEXT, ApiContext, client_ip
from httpapi.errors import ApiError, error_response, from_storage, retry_later
from httpapi.openapi import document
from runtime.metrics import counter, histogram
from storage.api import Storage
from storage.errors import StorageError
from storage.shared import shared_state
from storage.throttle import login_gate

log = logging.getLogger("httpapi")

STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_ROUTES = frozenset({"login", "openapi", "events_websocket"})
HEALTH_TIMEOUT = 5.0
# The webmail page: scripts and styles only from us; message HTML is shown in
# a sandboxed iframe (srcdoc) that inherits this policy, so it cannot run script.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: https: http:; connect-src 'self'; frame-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTTP_REQUESTS = counter(
    "shardmail_http_requests_total", "HTTP requests answered.", ["route", "status"]
)
HTTP_LATENCY = histogram(
    "shardmail_http_request_duration_seconds", "HTTP request handling time.", ["route"]
)


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    name = getattr(route, "name", None)
    if name:
        return str(name)
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    status = 500
    request[CLIENT_KEY] = client_ip(request, request.app[CONTEXT].settings.http.trusted_proxies)
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as err:
        status = err.status
        response = error_response(err)
        if status == 413:
            # The rest of the body was never read: drop the connection rather
            # than drain it (RFC 9110 section 15.5.14 allows closing).
            response.force_close()
        return response
    except StorageError as err:
        api = from_storage(err)
        status = api.status
        return error_response(api)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400 or not request.path.startswith("/v1"):
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "message_too_large"}.get(
            exc.status, "http_error"
        )
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return error_response(ApiError(exc.status, code, exc.reason, headers))
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal", "internal server error"))
    finally:
        name = _route_name(request)
        HTTP_REQUESTS.inc(route=name, status=str(status))
        HTTP_LATENCY.observe(time.monotonic() - started, route=name)


def _retry_after(wait: float) -> dict[str, str]:
    """RFC 6585 section 4: 429 may say when to retry; RFC 9110 section 10.2.3:
    Retry-After in whole seconds."""
    return {"Retry-After": str(max(1, math.ceil(wait)))}


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    ctx = request.app[CONTEXT]
    ip = client_ip(request, ctx.settings.http.trusted_proxies)
    wait = await ctx.ip_limit.take(f"ip:{ip}")
    if wait:
        raise ApiError(429, "rate_limited", "too many requests from this address",
                       _retry_after(wait))
    name = getattr(request.match_info.route, "name", None)
    header = request.headers.get("Authorization")
    if name in PUBLIC_ROUTES and not (name == "events_websocket" and header):
        return await handler(request)
    if request.match_info.http_exception is not None:
        return await handler(request)  # unknown route: a plain 404/405
    account = await ctx.auth.from_header(header, ip)
    wait = await ctx.user_limit.take(f"user:{account.id}")
    if wait:
        raise ApiError(429, "rate_limited", "too many requests for this account",
                       _retry_after(wait))
    request[ACCOUNT_KEY] = account
    return await handler(request)


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger aiohttp's connection handler reports through.

    A malformed request (bad request line, header or framing: aiohttp's
    ``HttpProcessingError``) is the client's fault, common on a public port,
    and gets one WARNING line with the peer and the reason; aiohttp would log
    a full traceback at ERROR. Anything else keeps its traceback.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message).split())  # aiohttp's carets span lines
            self.warning("%s: %s %s", str(msg) % args, exc.code, reason)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


SERVER_LOG = ServerLog(logging.getLogger("httpapi.server"), {})
ACCESS_LOG = logging.getLogger("httpapi.access")
# The client address for the access log (httpapi.context.client_ip).
CLIENT_KEY: Any = (
    web.RequestKey("shardmail_client_ip", str)
    if hasattr(web, "RequestKey")
    else "shardmail_client_ip"
)
# Query parameters whose values never reach a log (credentials a client may
# put in a URL, e.g. a WebSocket client that cannot set Authorization).
SECRET_PARAMS = frozenset({"token", "access_token", "password", "secret", "key", "auth"})


def loggable_target(request: web.BaseRequest) -> str:
    """The request target as received (still percent-encoded, so a logged
    line cannot be split by an encoded newline), secret query values masked."""
    url = request.rel_url
    if not url.raw_query_string:
        return url.raw_path
    pairs = []
    for pair in url.raw_query_string.split("&"):
        name, sep, _ = pair.partition("=")
        if sep and urllib.parse.unquote_plus(name).lower() in SECRET_PARAMS:
            pair = f"{name}=***"
        pairs.append(pair)
    return f"{url.raw_path}?{'&'.join(pairs)}"


class AccessLog(AbstractAccessLogger):
    """One INFO line per answered request on ``httpapi.access``:
    ``<client> "<METHOD> <target>" <status> <octets sent> <duration>ms``,
    octets counting the status line and headers too (nginx's ``$bytes_sent``:
    exact for streamed and chunked answers alike).
    The client is the X-Forwarded-For hop when the peer is a trusted proxy
    (:func:`httpapi.context.client_ip`), once the request was routed."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # Checked per request, not per connection (aiohttp's ``enabled``):
        # a level changed at run time applies to open keep-alive connections too.
        if not self.logger.isEnabledFor(logging.INFO):
            return
        # Set by errors_middleware; a request aiohttp could not parse never got there.
        remote = request.get(CLIENT_KEY) or request.remote or "-"
        self.logger.info(
            '%s "%s %s" %d %d %.1fms', remote, request.method, loggable_target(request),
            response.status, response.body_length, time * 1000,
        )


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(document(), dumps=lambda d: json.dumps(d, indent=1))


async def healthz(request: web.Request) -> web.Response:
    """200 when storage answers within 5 seconds, else 503."""
    storage = request.app[CONTEXT].storage
    try:
        await asyncio.wait_for(storage.directory.list_domains(), HEALTH_TIMEOUT)
    except (TimeoutError, StorageError, OSError) as exc:
        log.warning("health check failed: %s", exc)
        return web.json_response(
            {"status": "unavailable", "storage": "unreachable"}, status=503,
            headers=retry_later(),
        )
    return web.json_response({"status": "ok", "storage": "ok"})


async def webmail(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        STATIC_DIR / "index.html",
        headers={
            "Content-Security-Policy": PAGE_CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


async def _close_websockets(app: web.Application) -> None:
    # 1001 "going away" (RFC 6455 section 7.4.1): clients reconnect elsewhere.
    for ws in list(app[CONTEXT].websockets):
        await ws.close(code=1001, message=b"server shutting down")


def build_app(settings: Settings, storage: Storage, secret: bytes) -> web.Application:
    """The application for one process. ``secret`` is the site token key
    (:func:`httpapi.service.site_token_key`)."""
    app = web.Application(
        middlewares=[errors_middleware, access_middleware],
        # Handlers read bodies through httpapi.body with their route's limit;
        # this only caps a request.read() that bypasses it.
        client_max_size=JSON_BODY_LIMIT,
    )
    shared = shared_state(storage, settings.redis)  # counted by every instance with [redis]
    app[CONTEXT] = ApiContext(
        settings=settings,
        storage=storage,
        auth=Authenticator(
            storage,
            TokenSigner(secret, settings.http.token_lifetime_seconds),
            login_gate(storage, settings.auth, settings.redis),
        ),
        user_limit=shared.rate_limit("http-user", settings.http.rate_limit_per_user, 60.0),
        ip_limit=shared.rate_limit("http-ip", settings.http.rate_limit_per_ip, 60.0),
    )
    app.router.add_get("/", webmail, name="webmail", allow_head=False)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    app.router.add_get("/healthz", healthz, name="healthz", allow_head=False)
    app.router.add_get("/v1/openapi.json", openapi_document, name="openapi", allow_head=False)
    for module in (session, folders, messages, search, realtime, autoconfig, spam):
        app.add_routes(module.routes)
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(_close_websockets)
    return app
