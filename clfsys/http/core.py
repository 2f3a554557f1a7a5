"""What every protocol shares: the model behind the routes (Backend, Service), the Error shape,
limits, auth, body reading and JSON parsing, the one table of outputs, and the Route record that
each protocol module lists its routes in (app.py registers them)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import to_json

from clfsys import images

IMAGE_ERROR_STATUS = {images.EMPTY: 400, images.NOT_AN_IMAGE: 422, images.TRUNCATED: 422,
                      images.TOO_MANY_PIXELS: 422}


class Error(BaseModel):
    error: str = Field(description="What was wrong with the request, in one line")


# ---------------------------------------------------------------- the model behind the routes

class Backend(Protocol):
    """What the routes need from the model: the Serve replica, or DirectBackend."""

    name: str
    model_id: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    metadata: dict[str, Any]
    node_id: str | None
    max_batch_size: int

    async def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> the model's uint8 input (raises images.ImageError); off the loop."""

    async def classify(self, image: np.ndarray) -> dict[str, Any]:
        """One (H, W, C) uint8 image -> one `Predictor.rows` record (batched by the backend)."""


class DirectBackend:
    """A Predictor in this process, batch of one per call: for tools and tests without Ray."""

    def __init__(self, predictor, name: str = "clfsys", max_batch_size: int = 32):
        self.predictor, self.name, self.max_batch_size = predictor, name, max_batch_size
        self.model_id = predictor.model_id
        self.class_names = predictor.class_names
        self.input_shape = predictor.bundle.input_shape
        self.metadata = predictor.bundle.metadata
        self.node_id = None

    async def decode(self, data: bytes) -> np.ndarray:
        return await asyncio.to_thread(self.predictor.decode, data)

    async def classify(self, image: np.ndarray) -> dict[str, Any]:
        (row,) = await asyncio.to_thread(self.predictor.rows, image[None])
        return row


class Metrics(Protocol):
    def request(self, route: str, method: str, status: int, seconds: float) -> None: ...
    def decode_error(self, kind: str) -> None: ...


class HttpError(Exception):
    """A 4xx answer: `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_files: int = 256


class Service:
    """The one model an app serves, as every route handler reads it (`service(request)`)."""

    def __init__(self, backend: Backend, limits: Limits, metrics: Metrics | None = None):
        self.backend, self.limits, self.metrics = backend, limits, metrics
        self.name = backend.name

    def check_name(self, model: str) -> None:
        if model != self.name:
            raise HttpError(404, f"no model {model!r} on this server; this is {self.name!r}")

    async def decode(self, data: bytes) -> np.ndarray:
        try:
            return await self.backend.decode(data)
        except images.ImageError as exc:
            if self.metrics is not None:
                self.metrics.decode_error(exc.kind)
            raise HttpError(IMAGE_ERROR_STATUS.get(exc.kind, 422), str(exc)) from None

    async def classify(self, items: list[Any]) -> list[dict[str, Any]]:
        """Encoded images or pixel arrays -> one `Predictor.rows` record each, in order."""
        arrays = [item if isinstance(item, np.ndarray) else await self.decode(item)
                  for item in items]
        return list(await asyncio.gather(*(self.backend.classify(a) for a in arrays)))


def service(request) -> Service:
    return request.app.state.clfsys


# ---------------------------------------------------------------- the outputs every protocol has

@dataclass(frozen=True)
class Output:
    """One output of the model, as each protocol names its type."""

    name: str
    python_type: Any
    v2_datatype: str
    tf_dtype: str
    per_class: bool = False  # one value per class: shape [N, classes], not [N]


OUTPUTS = (Output("label", str, "BYTES", "DT_STRING"),
           Output("label_index", int, "INT64", "DT_INT64"),
           Output("confidence", float, "FP32", "DT_FLOAT"),
           Output("probabilities", list[float], "FP32", "DT_FLOAT", per_class=True))
OUTPUT_NAMES = tuple(o.name for o in OUTPUTS)


# ---------------------------------------------------------------- requests

def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(header: str, token_sha256: str | None) -> None:
    """Raise 401 unless `header` is 'Bearer <token>' with the configured token."""
    if token_sha256 is None:
        return
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            token_digest(presented.strip()), token_sha256):
        raise HttpError(401, "missing or invalid bearer token")


async def read_body(request, limits: Limits) -> bytes:
    """The request body, refused with 413 as soon as it passes the limit."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise HttpError(413, f"body of {int(declared):,} bytes exceeds the "
                             f"{limits.max_body_bytes:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise HttpError(413, f"body exceeds the {limits.max_body_bytes:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(model: type[BaseModel], body: bytes, what: str):
    """`body` as `model`, or 400 naming the first field that is wrong."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HttpError(400, f"invalid {what}: {where}: {first['msg']}") from None


def b64_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise HttpError(400, f"{where}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{where}: not valid base64") from None


def pixels(values: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A uint8 array of `shape` from JSON numbers (nested or flat), or 400."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise HttpError(400, f"{where}: pixels must be numbers") from None
    if array.size != int(np.prod(shape)):
        raise HttpError(400, f"{where}: expected {int(np.prod(shape)):,} values for shape "
                             f"{list(shape)}, got {array.size:,}")
    if not np.all((array >= 0) & (array <= 255) & (array == np.floor(array))):
        raise HttpError(400, f"{where}: pixels must be integers from 0 to 255")
    return array.astype(np.uint8).reshape(shape)


def answer(payload: Any) -> Response:
    """A JSON answer built by a handler to its route's response model. FastAPI would validate
    it against that model once more and then serialize it; the inference routes skip that (the
    schema tests check the answers against the OpenAPI document)."""
    return Response(to_json(payload), media_type="application/json")


# ---------------------------------------------------------------- routes, as the modules list them

@dataclass(frozen=True)
class Route:
    """One route of a protocol: app.build_api registers it on the model's FastAPI app."""

    method: str
    path: str
    handler: Callable
    response_model: Any
    summary: str
    errors: tuple[int, ...] = ()  # the 4xx it documents (401 is added where the token applies)
    guarded: bool = True  # behind the bearer token when one is set (health routes are not)
    inference: bool = False  # tried first: each route Starlette tries before the match costs
    upload: dict[str, Any] | None = None  # an OpenAPI request body of raw or multipart images
    json_body: type[BaseModel] | None = None  # a JSON request body the handler parses itself
