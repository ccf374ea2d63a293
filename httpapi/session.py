"""Login: ``POST /v1/login`` exchanges an address and password for a bearer token."""

from __future__ import annotations

from aiohttp import web

from httpapi.body import LOGIN_BODY_LIMIT, json_body
from httpapi.context import account_of, client_ip, context
from httpapi.errors import bad_request
from httpapi.views import json_response

routes = web.RouteTableDef()

MAX_CREDENTIAL = 1024


@routes.post("/v1/login", name="login")
async def login(request: web.Request) -> web.Response:
    ctx = context(request)
    body = await json_body(request, LOGIN_BODY_LIMIT)
    address, password = body.get("address"), body.get("password")
    if not isinstance(address, str) or not isinstance(password, str) or not address:
        raise bad_request("address and password are required strings", "invalid_credentials")
    if len(address) > MAX_CREDENTIAL or len(password) > MAX_CREDENTIAL:
        raise bad_request("credentials too long", "invalid_credentials")
    ip = client_ip(request, ctx.settings.http.trusted_proxies)
    account = await ctx.auth.login(address.strip(), password, ip)
    token, expires = ctx.auth.signer.issue(account)
    return json_response({
        "token": token,
        "token_type": "Bearer",
        "expires_at": expires,
        "account": {"id": account.id, "address": account.address},
    })


@routes.get("/v1/me", name="whoami")
async def whoami(request: web.Request) -> web.Response:
    account = account_of(request)
    ctx = context(request)
    used = await ctx.storage.mail(account).quota_used(account.id)
    return json_response({
        "id": account.id,
        "address": account.address,
        "quota_bytes": account.quota_bytes,
        "quota_used": used,
    })
