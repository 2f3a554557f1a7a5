"""The FastAPI app for one model: registers the routes of the three protocols (clfsys's own,
V2, TF Serving), the bearer token, the Error shape for every 4xx, and the OpenAPI document."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from clfsys.http import native, tfserving, v2
from clfsys.http.asgi import MetricsMiddleware
from clfsys.http.core import (
    Backend,
    Error,
    HttpError,
    Limits,
    Metrics,
    Route,
    Service,
    check_bearer,
)

# The inference routes first: Starlette tries routes in order, each one before the match
# costing ~3 us a request.
ROUTES = sorted(native.ROUTES + v2.ROUTES + tfserving.ROUTES, key=lambda r: not r.inference)

MEANING = {400: "Malformed request or empty image", 401: "Missing or invalid bearer token",
           404: "No model of that name here", 413: "Body over the size limit",
           415: "Unsupported content type", 422: "Not a decodable image"}


def build_api(backend: Backend, limits: Limits, token_sha256: str | None = None,
              metrics: Metrics | None = None):
    """The app for one model. Routes are relative to the app's prefix."""
    # telemetry off: the endpoint has its own Prometheus metrics, and FastAPI's check for an
    # OpenTelemetry provider costs every request ~3 us.
    api = FastAPI(title=f"clfsys: {backend.name}", docs_url=None, redoc_url=None,
                  openapi_url=None, telemetry={"tracing": False, "metrics": False, "logs": False},
                  description="Image classification with a clfsys model bundle: POST an image "
                  "to /predict, or use the Open Inference Protocol (/v2) or TF Serving's REST "
                  "API (/v1). Errors are {\"error\": \"...\"}.")
    api.state.clfsys = Service(backend, limits, metrics)
    api.state.token_sha256 = token_sha256
    api.add_exception_handler(HttpError, http_error)
    api.add_exception_handler(StarletteHTTPException, routing_error)
    guard = [Depends(HTTPBearer(auto_error=False, description="The token in --auth-token-env")),
             Depends(authorized)] if token_sha256 else []
    for route in ROUTES:
        add_route(api, route, guard if route.guarded else [])
    api.add_api_route("/openapi.json", openapi_json, methods=["GET"], include_in_schema=False,
                      dependencies=guard)
    api.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False,
                      dependencies=guard)
    return MetricsMiddleware(api, metrics) if metrics is not None else api


def add_route(api: FastAPI, route: Route, guard: list) -> None:
    codes = sorted(set(route.errors) | ({401} if guard else set()))
    extra = route.upload or (json_body(route.json_body) if route.json_body else None)
    api.add_api_route(route.path, route.handler, methods=[route.method],
                      response_model=route.response_model, summary=route.summary,
                      dependencies=guard, openapi_extra=extra,
                      responses={code: {"model": Error, "description": MEANING[code]}
                                 for code in codes})


def json_body(model) -> dict[str, Any]:
    """A JSON request body of `model`, on a route whose {model} parameter the handler reads
    itself: FastAPI's validation of a declared path parameter costs each request ~8 us."""
    return {"parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string", "title": "Model"}}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


async def authorized(request: Request) -> None:
    check_bearer(request.headers.get("authorization", ""), request.app.state.token_sha256)


async def http_error(_request, exc: HttpError):
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def routing_error(request: Request, exc: StarletteHTTPException):
    # An unknown route or method: the documented Error shape, not FastAPI's {"detail"}, so that
    # a protocol client (tritonclient reads "error") can decode it.
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


def openapi_schema(api: FastAPI) -> dict[str, Any]:
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version="1", description=api.description,
                             routes=api.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # FastAPI documents a 422 for its own parameter validation, which a string path
        # parameter never fails; every 4xx here is an Error.
        for item in schema["paths"].values():
            for operation in item.values():
                found = operation["responses"].get("422", {})
                if "HTTPValidationError" in json.dumps(found):
                    del operation["responses"]["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        for model in (r.json_body for r in ROUTES if r.json_body):
            found = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(found.pop("$defs", {}))
            components[model.__name__] = found
        api.openapi_schema = schema
    return api.openapi_schema


async def openapi_json(request: Request):
    return JSONResponse(openapi_schema(request.app))


async def docs(request: Request):
    prefix = request.scope.get("root_path", "").rstrip("/")
    return HTMLResponse(get_swagger_ui_html(openapi_url=f"{prefix}/openapi.json",
                                            title=request.app.title).body)
