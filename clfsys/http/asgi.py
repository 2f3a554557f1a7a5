"""ASGI plumbing around a model's app: NameRouter hands a V2 or TF Serving request for another
model's name to that model's app (call_asgi runs one there, in-process), and MetricsMiddleware
counts requests by route, method and status."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from clfsys.http.core import HttpError, Limits, Metrics, read_body

Forward = Callable[[str, dict[str, Any]], Awaitable["Forwarded | None"]]


@dataclass(frozen=True)
class Forwarded:
    """An HTTP answer produced by another model's app (see NameRouter)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class NameRouter:
    """ASGI middleware of the app at the server root: a V2 or TF Serving request for another
    model's name (/v2/models/NAME/..., /v1/models/NAME...) is handed to that model's app by
    `forward(name, request)`, so every model answers both protocols at the root as well as
    under its own prefix. The named model applies its own auth, limits and metrics. A name no
    app serves falls through to `app`, which answers 404."""

    ROUTE = re.compile(r"^/v[12]/models/([^/:]+)")

    def __init__(self, app, own_name: str, forward: Forward, limits: Limits):
        self.app, self.own_name, self.forward, self.limits = app, own_name, forward, limits

    def __getattr__(self, item):
        return getattr(self.app, item)

    async def __call__(self, scope, receive, send):
        found = self.ROUTE.match(scope.get("path", "")) if scope["type"] == "http" else None
        if found is None or found.group(1) == self.own_name:
            return await self.app(scope, receive, send)
        try:
            body = await read_body(Request(scope, receive), self.limits)
        except HttpError as exc:
            error = JSONResponse({"error": exc.message}, status_code=exc.status)
            return await error(scope, receive, send)
        except ClientDisconnect:
            return
        request = {"method": scope["method"], "path": scope["path"],
                   "query_string": scope.get("query_string", b""),
                   "headers": list(scope.get("headers", [])), "body": body}
        forwarded = await self.forward(found.group(1), request)
        if forwarded is None:
            return await self.app(scope, _receive_once(request["body"]), send)
        await send({"type": "http.response.start", "status": forwarded.status,
                    "headers": forwarded.headers})
        await send({"type": "http.response.body", "body": forwarded.body})


def _receive_once(body: bytes):
    """An ASGI `receive` that gives the whole `body`, then a disconnect."""
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    return receive


async def call_asgi(app, request: dict[str, Any]) -> Forwarded:
    """Run one request (as NameRouter hands it over) through the ASGI `app` in this process."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"],
             "raw_path": request["path"].encode(), "query_string": request["query_string"],
             "root_path": "", "headers": request["headers"], "client": None, "server": None}
    status, headers, body = 500, [], []

    async def send(message):
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(scope, _receive_once(request["body"]), send)
    return Forwarded(status, headers, b"".join(body))


class MetricsMiddleware:
    """ASGI middleware: counts requests by route template, method and status, with latency."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    def __getattr__(self, item):  # Serve and tests reach the FastAPI app's attributes
        return getattr(self.app, item)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.request(getattr(route, "path", "unmatched"), scope.get("method", ""),
                                 status, time.perf_counter() - started)
